"""INT8 GPT-J for plain TensorFlow: export, calibrate, quantize, rebuild, benchmark."""
import os

# transformers' TF models need Keras 2; oneDNN's int8 kernels need the oneDNN path on.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
