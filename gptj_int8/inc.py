"""Intel Neural Compressor (INC 3.10) as quantize.py's second engine (`--engine inc`).

Every INC call of the project lives here. INC's TensorFlow path freezes the SavedModel into one
GraphDef whose weights are constants (capped at 2 GB by protobuf) and needs many times the
model's size in memory, so the run is refused up front when the estimate does not fit; the
default engine (convert.ConvertSavedModel) keeps weights in variables and has neither limit.
INC's graph is then made to compute the same on every CPU: its layer norms fused with the model's
epsilon, which TensorFlow's oneDNN rewrites would otherwise replace by 0.001, and its activation
ranges given whole zero points, on which TensorFlow's and oneDNN's QuantizeV2 agree.
"""
import collections
import contextlib
import json
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from . import savedmodel
from .cli import UserError
from .graph import GraphIndex, make_const, make_node, node_name
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
FUSED_LAYER_NORM = "_MklLayerNorm"  # oneDNN's layer norm, which TensorFlow's remapper fuses GPT-J's into
U8_LEVELS = 255                     # INC's activations take every u8 level (ours take 128, weights.ACTIVATION_LEVELS)


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


def quantization_configs(smooth_quant=False, sq_alpha=0.5, fp32_ops=()):
    """INC's recipe for our flags: SmoothQuant (if asked) then static int8 quantization (INC's
    defaults: symmetric int8 weights per tensor, min/max calibrated activations), `fp32_ops` (node
    names) kept FP32 through INC's op-wise configuration."""
    from neural_compressor.tensorflow import SmoothQuantConfig, StaticQuantConfig
    static = StaticQuantConfig()
    for name in fp32_ops:   # INC matches a local config's name as a regular expression
        static.set_local(re.escape(name), StaticQuantConfig(weight_dtype="fp32", act_dtype="fp32"))
    return [SmoothQuantConfig(alpha=sq_alpha), static] if smooth_quant else static


def kept_matmuls(graph_def, keep_fp32):
    """The MatMuls of INC's graph whose names contain one of the comma-separated parts of
    `keep_fp32` (layer names, as quantize.py --keep_fp32 takes them: INC's graph is serving_default's,
    whose MatMul names hold the layers' names)."""
    patterns = [p.strip() for p in (keep_fp32 or "").split(",") if p.strip()]
    matmuls = [n.name for n in graph_def.node if n.op == "MatMul"]
    unknown = [p for p in patterns if not any(p in m for m in matmuls)]
    if unknown:
        raise UserError(f"--keep_fp32: {', '.join(map(repr, unknown))} names no MatMul of INC's graph")
    return [m for m in matmuls if any(p in m for p in patterns)]


def op_counts(graph_def):
    return collections.Counter(node.op for node in graph_def.node)


def quantize_saved_model(src, dst, calibration_batches, output_dir, smooth_quant=False, sq_alpha=0.5, itex_mode=False,
                         side_files=(), keep_fp32=None):
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
        fp32_graph, fixed = with_layer_norm_epsilon(model.graph_def, layer_norm_epsilon(src))
        if fixed:
            model.graph_def = fp32_graph    # INC calibrates on it: its ranges are those of the model it serves
            epsilons = sorted({n.attr["epsilon"].f for n in fp32_graph.node if n.op == FUSED_LAYER_NORM})
            log.info("INC: %d layer norms fused as %s with the model's epsilon %s (%s)", fixed, FUSED_LAYER_NORM,
                     ", ".join(f"{e:.3g}" for e in epsilons), LAYER_NORM_WHY)
        savedmodel.write_graph_def(fp32_graph, output_dir / "extracted_graph_def.pb")
        inputs = sorted(model.input_tensor_names)
        if inputs != sorted(savedmodel.INPUTS) or model.output_tensor_names != [INC_OUTPUT]:
            raise UserError(f"INC read {src} as inputs {inputs}, outputs {model.output_tensor_names}; "
                            f"expected {', '.join(savedmodel.INPUTS)} -> {INC_OUTPUT}")
        kept = kept_matmuls(fp32_graph, keep_fp32)
        if kept:
            log.info("INC: FP32 kept for %d MatMuls, as --keep_fp32=%r asks: %s", len(kept), keep_fp32, ", ".join(kept))
        configs = quantization_configs(smooth_quant, sq_alpha, kept)
        log.info("INC: quantizing %d MatMuls (itex_mode=%s, smooth_quant=%s)",
                 op_counts(fp32_graph)["MatMul"], itex_mode, smooth_quant and sq_alpha)
        loader = CalibrationLoader(calibration_batches)
        quantized = quantize_model(model, configs, loader, calib_iteration=len(loader))
    graph_def, moved = with_whole_zero_points(stock_tf_graph(quantized.graph_def))
    log.info("INC: %d activation ranges moved to a whole zero point (int32 bias compensated), so that "
             "TensorFlow's QuantizeV2 and oneDNN's give the same int8 input", moved)
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


# ---------------------------------------------------------------- INC's graph, right on every CPU

LAYER_NORM_WHY = ("TensorFlow's oneDNN rewrites, on by default on CPUs with AVX-512 VNNI, BF16 or AMX, would fuse "
                  "them with epsilon 0.001: argmax agreement with FP32 0.85 instead of 0.99 on the bundled model")


def layer_norm_epsilon(model_dir):
    """GPT-J's layer_norm_epsilon from the config.json beside a SavedModel, or None."""
    config = Path(model_dir) / "config.json"
    return json.loads(config.read_text()).get("layer_norm_epsilon") if config.is_file() else None


def with_layer_norm_epsilon(graph_def, epsilon):
    """(INC's frozen graph with every layer norm one `_MklLayerNorm` of the model's epsilon, how many changed).

    INC freezes the weights into constants, and TensorFlow's grappler remapper, whenever its oneDNN
    rewrites are on (TF_ENABLE_ONEDNN_OPTS, the default on CPUs with AVX-512 VNNI, BF16 or AMX),
    fuses a layer norm of constant gamma and beta into `_MklLayerNorm` without its epsilon: the op's
    default 0.001 replaces GPT-J's 1e-5 (TF 2.21, measured). It does so when INC loads the
    SavedModel, and again whenever the saved graph is loaded on such a CPU, so even a graph
    converted on an AVX2 CPU, right there, goes wrong on a VNNI one. The remapper leaves a fused
    layer norm alone, and `_MklLayerNorm` runs with the rewrites off too. Written-out layer norms
    keep their own epsilon; fused ones take `epsilon` (config.json's: the fusion dropped the graph's)."""
    index = GraphIndex(graph_def)
    fused = {}
    for node in graph_def.node:
        if node.op == FUSED_LAYER_NORM and node.attr["epsilon"].f != np.float32(epsilon or 0):
            if epsilon is None:
                raise UserError("INC's frozen graph fused the layer norms and lost their epsilon, and the input "
                                "model has no config.json with layer_norm_epsilon to restore it from")
            fused[node.name] = _copy(node)
            fused[node.name].attr["epsilon"].f = epsilon
    written_out = [parts for n in graph_def.node if n.op == "Rsqrt" and (parts := _written_out_layer_norm(index, n))]
    ranks = _ranks(graph_def, [inputs[0] for _, inputs, _, _ in written_out]) if written_out else []
    for (output, inputs, own_epsilon, axis), rank in zip(written_out, ranks):
        if axis == -1 or rank is not None and axis == rank - 1:     # _MklLayerNorm normalizes the last axis
            fused[output] = make_node(FUSED_LAYER_NORM, output, inputs, T=index.nodes[output].attr["T"],
                                      epsilon=own_epsilon)
    return _with_nodes(graph_def, fused), len(fused)


def _written_out_layer_norm(index, rsqrt):
    """(output node name, [x, gamma, beta], epsilon, reduced axis) of the layer norm around `rsqrt`,
    written out as tf.nn.batch_normalization writes it (tf-keras's LayerNormalization at GPT-J's
    epsilon), or None: x * scale + (beta - mean * scale), scale = rsqrt(variance + epsilon) * gamma."""
    def inputs_by_op(node):
        return {index.producer(i).op: index.producer(i) for i in node.input}

    def consumer(node, ops, other):     # the consumer of `node` of one of `ops` whose other input is `other`
        return next((c for c in index.consumers[node.name]
                     if c.op in ops and sorted(map(node_name, c.input)) == sorted([node.name, other])), None)

    add = index.producer(rsqrt.input[0])
    variance, epsilon = inputs_by_op(add).get("Mean"), inputs_by_op(add).get("Const")
    if add.op not in ("AddV2", "Add") or variance is None or epsilon is None:
        return None
    squares = index.producer(variance.input[0])
    mean = inputs_by_op(squares).get("Mean") if squares.op == "SquaredDifference" else None
    scales = [c for c in index.consumers[rsqrt.name] if c.op == "Mul"]
    if mean is None or len(scales) != 1 or not mean.attr["keep_dims"].b:
        return None
    axes = index.producer(mean.input[1])
    axes = tf.make_ndarray(axes.attr["value"].tensor).ravel() if axes.op == "Const" else []
    x, scale = mean.input[0], scales[0]
    gamma = [i for i in scale.input if node_name(i) != rsqrt.name]
    x_scaled, mean_scaled = consumer(scale, ("Mul",), node_name(x)), consumer(scale, ("Mul",), mean.name)
    shift = mean_scaled and next((c for c in index.consumers[mean_scaled.name]
                                  if c.op == "Sub" and node_name(c.input[1]) == mean_scaled.name), None)
    output = x_scaled and shift and consumer(x_scaled, ("AddV2", "Add"), shift.name)
    if not output or len(gamma) != 1 or len(axes) != 1:
        return None
    return (output.name, [x, gamma[0], shift.input[0]], float(tf.make_ndarray(epsilon.attr["value"].tensor)),
            int(axes[0]))


def _ranks(graph_def, tensors):
    """The rank of each of `tensors` in `graph_def`, by TensorFlow's shape inference."""
    with tf.Graph().as_default() as graph:
        tf.graph_util.import_graph_def(graph_def, name="")
    return [graph.get_tensor_by_name(t if ":" in t else f"{t}:0").shape.rank for t in tensors]


def with_whole_zero_points(graph_def):
    """(INC's converted graph with each activation range moved by under one step so that its zero
    point is whole, the int32 bias of the kernels it feeds compensated for it; how many moved).

    INC gives QuantizeV2 (MIN_FIRST) the calibrated range as it is, whose zero point is fractional,
    and folds that fractional zero point into each kernel's int32 bias. oneDNN's QuantizeV2 (run
    when TF_ENABLE_ONEDNN_OPTS is on, the default on CPUs with AVX-512 VNNI or AMX) rounds x * scale
    plus the zero point as one, which matches; TensorFlow's own (the default elsewhere) adds a rounded
    zero point, and every output is then off by the difference times the weights' column sum. A
    whole zero point is our converter's rule too (weights.u8_activation_range), here at INC's 255 levels.
    Ranges that feed anything but a kernel with an int32 bias are left as INC wrote them."""
    index = GraphIndex(graph_def)
    replaced = {}
    for q in graph_def.node:
        kernels = list({k.name: k for k in index.consumers[q.name]}.values())
        if (q.op != "QuantizeV2" or q.attr["mode"].s != b"MIN_FIRST" or not kernels
                or any(k.op != "_QuantizedMatMul" or k.attr["Tbias"].type != tf.qint32.as_datatype_enum
                       or node_name(k.input[0]) != q.name for k in kernels)):
            continue
        lo, hi = (float(_value(index, i)) for i in q.input[1:3])
        step = (hi - lo) / U8_LEVELS
        zero = -lo / step
        whole = min(max(round(zero), 0), U8_LEVELS)
        if abs(zero - whole) < 1e-3:        # whole already, to float32's precision
            continue
        # new constants: INC shares one constant between ranges of equal value
        ends = [make_const(f"{q.name}/whole_zero_point_{end}", np.float32(v), tf.float32)
                for end, v in (("min", -whole * step), ("max", (U8_LEVELS - whole) * step))]
        replaced.update({e.name: e for e in ends})
        replaced[q.name] = _copy(q, {1: ends[0].name, 2: ends[1].name})
        for k in kernels:
            weight = _value(index, k.input[1]).view(np.int8).astype(np.int64)
            column_sums = weight.sum(axis=1 if k.attr["transpose_b"].b else 0)
            bias = _value(index, k.input[2]).view(np.int32) + (zero - whole) * column_sums
            bias = make_const(f"{k.name}/whole_zero_point_bias", np.round(bias).astype(np.int32), tf.qint32)
            replaced[bias.name], replaced[k.name] = bias, _copy(k, {2: bias.name})
    moved = sum(n.op == "QuantizeV2" for n in replaced.values())
    return _with_nodes(graph_def, replaced), moved


def _value(index, tensor):
    return tf.make_ndarray(index.producer(tensor).attr["value"].tensor)


def _copy(node, inputs=None):
    """A copy of `node` with the inputs {index: tensor} given."""
    out = type(node)()
    out.CopyFrom(node)
    for i, tensor in (inputs or {}).items():
        out.input[i] = tensor
    return out


def _with_nodes(graph_def, nodes):
    """`graph_def` with `nodes` ({name: node}) in place of those of their names or added, without
    the nodes its output no longer reads (the parts of a fused layer norm, replaced constants)."""
    if not nodes:
        return graph_def
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    out.node.extend(nodes.get(n.name, n) for n in graph_def.node)
    names = {n.name for n in graph_def.node}
    out.node.extend(n for name, n in nodes.items() if name not in names)
    serving = savedmodel.ServingGraph(out, {k: k for k in savedmodel.INPUTS}, {savedmodel.OUTPUT: f"{INC_OUTPUT}:0"}, {})
    return savedmodel.prune(serving).graph_def


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
