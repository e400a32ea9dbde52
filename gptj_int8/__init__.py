"""INT8 GPT-J for plain TensorFlow: export, calibrate, quantize, rebuild, benchmark, generate."""
import os
import sys

# transformers' TF models need Keras 2; TensorFlow's C++ INFO and WARNING lines are not for users.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# transformers imports torch, where it is installed, with its first tokenizer: 0.27 GB of memory in
# every script, a tenth of a 1-layer model. Told that TensorFlow is the framework, it leaves torch
# alone; what reads PyTorch weights (prepare_model.py, for a pytorch_model.bin) sets USE_TF=AUTO first.
os.environ.setdefault("USE_TF", "1")
# With its oneDNN optimizations on (TensorFlow's default on CPUs with AVX-512 VNNI or AMX), TensorFlow
# allocates every tensor of 4 KB or more from a pool of its own (a BFC allocator) that never gives memory
# back to the OS: the FP32 weights a conversion frees once their int8 copies exist stay in its RSS, what
# a machine runs out of, and quantize.py's peak at GPT-J-6B's width with 1 layer was 1.70x the FP32
# variables instead of 1.46x with the optimizations off, and varied run to run with the pool's layout.
# oneDNN's switch sends those tensors to malloc and free, as with the optimizations off; the int8 and
# FP32 steps time the same either way (bench/memory.py; AMD EPYC Zen 4, 4 December).
os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")


def _import_tensorflow_quietly():
    """Import TensorFlow and list its devices with the process's stderr closed. What it prints
    then (CUDA probing on a CPU-only machine, absl's notice that logging is not initialised yet)
    comes from C++ before any log level applies. Only the import is silenced: errors raised later, and an
    import that fails, still reach the user."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow
        tensorflow.config.list_physical_devices()   # where CUDA is probed, once per process
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


_import_tensorflow_quietly()
