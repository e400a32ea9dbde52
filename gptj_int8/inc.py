"""Intel Neural Compressor (INC 3.10) as quantize.py's second engine (`--engine inc`).

Every INC call of the project lives here. INC's TensorFlow path freezes the SavedModel into one
GraphDef whose weights are constants (capped at 2 GB by protobuf) and needs many times the
model's size in memory, so the run is refused up front when the estimate does not fit; the
default engine (convert.ConvertSavedModel) keeps weights in variables and has neither limit.
"""
import collections
import contextlib
import logging
import shutil
import time
from pathlib import Path

import tensorflow as tf

from . import savedmodel
from .cli import UserError
from .graph import make_node
from .memory import available_memory

log = logging.getLogger(__name__)

# Peak RSS of quantize.py --engine inc = base + ratio x FP32 SavedModel size: a bound over the
# runs measured on this project's machine (TF 2.21, INC 3.10, `/usr/bin/time -v python quantize.py
# --engine inc ...`, README "### 2."): 22 MB -> 1.6 GB, 135 MB -> 6.2 GB, 237 MB -> 7.6 GB, and a
# 608 MB GPT-J killed at 24 GB. The base is TensorFlow, transformers and INC themselves; the ratio
# covers the frozen graph, INC's copies of it and the tensors its calibration dumps.
INC_PEAK_BASE_BYTES = 1.0e9
INC_PEAK_PER_MODEL_BYTE = 40.0
PROTOBUF_LIMIT_BYTES = 2 ** 31      # INC serialises the frozen graph, weights included, in one protobuf
INC_OUTPUT = "Identity"             # the output INC's frozen graph ends in (serving_default's logits)
INC_INT8_MATMUL = "QuantizedMatMulWithBiasAndDequantize"


# ---------------------------------------------------------------- flags and memory, before any work

def check_installed():
    try:
        import neural_compressor.tensorflow  # noqa: F401
    except ImportError as e:
        raise UserError(f"--engine inc needs neural-compressor 3.10 (pip install -r requirements.txt): {e}")


def check_supported_flags(itex_mode, performance_only, max_accuracy_drop, per_channel=None, int8_kernel=None):
    """Refuse the flags INC 3.10's TensorFlow API cannot honour, one line each."""
    if int8_kernel is not None:
        raise UserError("--int8_kernel chooses the default engine's int8 kernels; INC 3.10 writes its own "
                        "(QuantizedMatMulWithBiasAndDequantize): drop --engine inc, or the flag")
    if per_channel:
        raise UserError("--per_channel with --engine inc: INC 3.10 quantizes GPT-J's MatMul weights per tensor "
                        "even when StaticQuantConfig asks for per_channel (the converted graph is byte for byte "
                        "the same, measured); drop the flag, or use the default engine")
    if itex_mode and not itex_installed():
        # INC's ITEX adaptor raises for the same reason (TensorFlowAdaptor._check_itex)
        raise UserError("--itex_mode with --engine inc needs Intel Extension for TensorFlow, which INC's ITEX "
                        "backend requires and which is not installed; the default engine's --itex_mode "
                        "writes the QDQ form without it")
    if itex_mode and performance_only:
        raise UserError("--itex_mode --performance_only with --engine inc clips negative activations "
                        "(argmax agreement with FP32 0.03, measured); use one of the two, or the default engine")
    if performance_only:
        raise UserError("--performance_only with --engine inc changes nothing on GPT-J outside INC's ITEX backend (the "
                        "converted graph is byte for byte the same, measured); drop it, or use the default engine")
    if max_accuracy_drop is not None:
        raise UserError("--max_accuracy_drop is the default engine's accuracy-aware fallback; INC 3.10's "
                        "TensorFlow API has no per-MatMul fallback to map it to: drop --engine inc, or the flag")


def itex_installed():
    try:
        import intel_extension_for_tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def estimate_peak_rss(model_bytes):
    """Bytes of memory INC's quantize_model is expected to peak at for a SavedModel of `model_bytes`."""
    return INC_PEAK_BASE_BYTES + INC_PEAK_PER_MODEL_BYTE * model_bytes


def check_fits(model_dir, max_memory_gb=None):
    """Refuse, in one line naming the default engine, a model INC cannot quantize here."""
    size = savedmodel.saved_model_size(model_dir)
    if size > PROTOBUF_LIMIT_BYTES:
        raise UserError(f"{model_dir} is {size / 1e9:.1f} GB; INC freezes the weights into one protobuf, "
                        f"capped at 2 GB: use the default engine (drop --engine inc), which keeps them in variables")
    need, have = estimate_peak_rss(size), available_memory(max_memory_gb)
    if need > have:
        raise UserError(f"INC would need about {need / 1e9:.1f} GB of memory for {model_dir} "
                        f"({size / 1e9:.2f} GB), {have / 1e9:.1f} GB available: use the default engine "
                        f"(drop --engine inc), which needs about 1.34x the model's size")
    log.info("INC memory estimate %.1f GB of %.1f GB available", need / 1e9, have / 1e9)


# ---------------------------------------------------------------- quantization

class CalibrationLoader:
    """Our calibration batches in the form INC's calibration loop reads: ({input name: array}, label)."""

    def __init__(self, batches):
        self.batches = list(batches)
        self.batch_size = len(self.batches[0][0]) if self.batches else 1

    def __iter__(self):
        for input_ids, attention_mask, _ in self.batches:
            yield {"input_ids": input_ids, "attention_mask": attention_mask}, None

    def __len__(self):
        return len(self.batches)


def quantization_configs(smooth_quant=False, sq_alpha=0.5):
    """INC's recipe for our flags: SmoothQuant (if asked) then static int8 quantization (INC's
    defaults: symmetric int8 weights per tensor, min/max calibrated activations)."""
    from neural_compressor.tensorflow import SmoothQuantConfig, StaticQuantConfig
    static = StaticQuantConfig()
    return [SmoothQuantConfig(alpha=sq_alpha), static] if smooth_quant else static


def op_counts(graph_def):
    return collections.Counter(node.op for node in graph_def.node)


def quantize_saved_model(src, dst, calibration_batches, output_dir, smooth_quant=False, sq_alpha=0.5, itex_mode=False, side_files=()):
    """INC's quantize_model on the SavedModel `src`, rewritten as a SavedModel at `dst` with our
    signature. INC's work files go under `output_dir`/inc_workspace."""
    from neural_compressor.tensorflow import Model, quantize_model
    from neural_compressor.tensorflow.utils import TFConfig
    if not calibration_batches:
        raise UserError("calibration needs at least one passage")
    src, dst, output_dir = Path(src).resolve(), Path(dst).resolve(), Path(output_dir).resolve()
    if dst == src or src in dst.parents:
        raise UserError(f"the converted model cannot be written inside the input model: {dst}")
    workspace = output_dir / "inc_workspace"
    shutil.rmtree(workspace, ignore_errors=True)
    workspace.mkdir(parents=True)
    start = time.perf_counter()
    # INC also writes to relative paths fixed at import (./nc_workspace/<time>, e.g. SmoothQuant's
    # temporary SavedModel): running it from inside the workspace keeps them there too
    with contextlib.chdir(workspace):
        model = Model(str(src), conf={"workspace_path": str(workspace)})
        # INC picks its ITEX backend whenever ITEX is installed; the flag decides here
        TFConfig.global_config["backend"] = "itex" if itex_mode else "default"
        fp32_graph = model.graph_def
        savedmodel.write_graph_def(fp32_graph, output_dir / "extracted_graph_def.pb")
        inputs = sorted(model.input_tensor_names)
        if inputs != sorted(savedmodel.INPUTS) or model.output_tensor_names != [INC_OUTPUT]:
            raise UserError(f"INC read {src} as inputs {inputs}, outputs {model.output_tensor_names}; "
                            f"expected {', '.join(savedmodel.INPUTS)} -> {INC_OUTPUT}")
        configs = quantization_configs(smooth_quant, sq_alpha)
        log.info("INC: quantizing %d MatMuls (itex_mode=%s, smooth_quant=%s)",
                 op_counts(fp32_graph)["MatMul"], itex_mode, smooth_quant and sq_alpha)
        loader = CalibrationLoader(calibration_batches)
        quantized = quantize_model(model, configs, loader, calib_iteration=len(loader))
    graph_def = stock_tf_graph(quantized.graph_def)
    savedmodel.write_graph_def(graph_def, output_dir / "converted_graph_def.pb")
    ops = op_counts(graph_def)
    int8 = ops["_QuantizedMatMul"]
    log.info("INC: %d MatMuls -> %d int8 kernels, %d left in FP32 (%.0f s)",
             op_counts(fp32_graph)["MatMul"], int8, ops["MatMul"], time.perf_counter() - start)
    out = save_frozen_graph(graph_def, dst, side_files)
    log.info("wrote %s (%.1f MB; FP32 %.1f MB)", out, savedmodel.saved_model_size(out) / 1e6,
             savedmodel.saved_model_size(src) / 1e6)
    return out


def stock_tf_graph(graph_def):
    """INC's graph with each QuantizedMatMulWithBiasAndDequantize as TensorFlow's `_QuantizedMatMul`.

    INC's op has a kernel only after TensorFlow's oneDNN layout pass renames it, and that pass runs
    only with TF_ENABLE_ONEDNN_OPTS=1, which TensorFlow turns on by default only on CPUs with
    AVX-512 VNNI, BF16 or AMX; elsewhere (this AVX2 machine) the op's placeholder kernel returns
    nothing ("Missing 0-th output"). `_QuantizedMatMul` is the same oneDNN kernel registered
    directly: same inputs (INC's u8 activation, s8 weight, compensated int32 bias and ranges),
    Dequantize fused, so the model runs in stock TensorFlow whatever the CPU and the flag."""
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if node.op != INC_INT8_MATMUL:
            out.node.add().CopyFrom(node)
            continue
        # inputs 7 and 8 (the frozen output range) only matter for a requantized int8 output
        t1, t2, tbias = (tf.as_dtype(node.attr[k].type) for k in ("T1", "T2", "Tbias"))
        out.node.append(make_node(
            "_QuantizedMatMul", node.name, node.input[:7], T1=t1, T2=t2, Tbias=tbias, Tout=tf.float32,
            U=tf.float32, Tdevice_inputs=[], Tdevice_outputs=[], Thost_inputs=[t1, t2, tbias] + [tf.float32] * 4,
            Thost_outputs=[tf.float32], fused_ops=["BiasAdd", "Dequantize"],
            input_quant_mode=node.attr["input_quant_mode"].s.decode(), output_quant_mode="SCALED",
            transpose_a=node.attr["transpose_a"].b, transpose_b=node.attr["transpose_b"].b,
            is_weight_const=True, is_bias_const=True))
    return out


def save_frozen_graph(graph_def, dst, side_files=()):
    """A SavedModel whose serving_default runs INC's frozen graph and returns {"logits": ...}
    (INC's own saver keeps its output key `Identity`, which our scripts do not read)."""
    spec = [tf.TensorSpec([None, None], tf.int32, name=k) for k in savedmodel.INPUTS]

    @tf.function(input_signature=spec)
    def serving(input_ids, attention_mask):
        logits, = tf.graph_util.import_graph_def(
            graph_def, input_map={"input_ids:0": input_ids, "attention_mask:0": attention_mask},
            return_elements=[f"{INC_OUTPUT}:0"], name="inc")
        return {savedmodel.OUTPUT: logits}

    module = tf.Module()
    module.serving = serving
    need = graph_def.ByteSize()
    free = shutil.disk_usage(dst.parent if dst.parent.exists() else Path.cwd()).free
    if need * 1.1 + (64 << 20) > free:
        raise UserError(f"not enough disk space for {dst}: about {need / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")
    with savedmodel.atomic_folder(dst) as tmp:
        tf.saved_model.save(module, str(tmp), signatures={savedmodel.SIGNATURE: serving})
        for f in side_files:
            shutil.copy2(f, tmp / Path(f).name)
    return dst
