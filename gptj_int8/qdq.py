"""Where QuantizeV2/Dequantize pairs go, and how they become int8 kernels and int8 weights.

Two forms of the same calibrated quantization:
- `insert_qdq_pairs` (itex_mode): QuantizeV2 -> Dequantize before each MatMul input, the weight
  stored as int8 and dequantized in the graph. Intel Extension for TensorFlow fuses this pattern
  into int8 kernels; stock TensorFlow runs it as written (fake quantization).
- `fuse_int8_matmuls` (default): each QDQ + MatMul (+ BiasAdd) becomes TensorFlow's oneDNN
  `_QuantizedMatMul` on a u8 activation and an s8 weight read from an int8 variable, with
  `is_weight_const` so oneDNN keeps its reordered copy of the weight between calls; MatMuls
  that read one activation (q, k, v and fc_in) share one kernel.
Float ConcatV2 inputs (and, under performance_only, the attention BatchMatMulV2 inputs) get
QDQ pairs in both forms, as there is no int8 kernel for them in stock TensorFlow.
"""
import dataclasses
import logging
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

from .graph import GraphIndex, make_const, make_node, make_resource_placeholder, node_name

log = logging.getLogger(__name__)

##### Finding the sites #####


@dataclasses.dataclass
class MatMulSite:
    matmul: str               # the MatMul node
    activation: str           # tensor entering it
    weight: str               # placeholder bound to the FP32 weight variable
    bias_add: str = None      # BiasAdd after the Dense's Tensordot reshape, fused when present
    bias: str = None          # placeholder bound to the bias variable
    row_scale: np.ndarray = None   # SmoothQuant factors, multiplied into the weight's rows


def _variable_placeholder(index, graph, tensor):
    """The placeholder bound to a variable behind `tensor` (a ReadVariableOp), else None."""
    read = index.through_identity(tensor)
    if read.op != "ReadVariableOp":
        return None
    holder = index.through_identity(read.input[0])
    return holder.name if isinstance(graph.feeds.get(holder.name), tf.Variable) else None


def find_matmul_sites(graph):
    """Every float MatMul whose second input is a weight variable: the Dense layers."""
    index = GraphIndex(graph.graph_def)
    sites = []
    for node in graph.graph_def.node:
        if (node.op != "MatMul" or node.attr["T"].type != tf.float32.as_datatype_enum
                or node.attr["transpose_a"].b or node.attr["transpose_b"].b):
            continue
        weight = _variable_placeholder(index, graph, node.input[1])
        if weight is None:
            continue
        site = MatMulSite(node.name, node.input[0], weight)
        after = index.consumers[node.name]
        if len(after) == 1 and after[0].op == "Reshape" and len(index.consumers[after[0].name]) == 1:
            after = index.consumers[after[0].name]   # Tensordot: MatMul -> Reshape -> BiasAdd
        if len(after) == 1 and after[0].op == "BiasAdd":
            bias = _variable_placeholder(index, graph, after[0].input[1])
            if bias is not None:
                site.bias_add, site.bias = after[0].name, bias
        sites.append(site)
    return sites


# Ops whose output is not determined by their op, attributes and inputs alone.
_BY_NAME = {"Placeholder", "Merge", "Enter", "Exit", "NextIteration", "Switch", "LoopCond"}


def _value_numbers(index, tensors):
    """A number per node behind `tensors`, equal for nodes that compute the same value: the same
    op and attributes on the same inputs (stateful ops and placeholders are equal only to themselves)."""
    numbers, keys = {}, {}
    stack = [node_name(t) for t in tensors]
    while stack:
        name = stack[-1]
        if name in numbers:
            stack.pop()
            continue
        node = index.nodes[name]
        op_def = op_def_registry.get(node.op)
        by_name = node.op in _BY_NAME or op_def is None or op_def.is_stateful
        inputs = [] if by_name else [i for i in node.input if not i.startswith("^")]
        missing = [node_name(i) for i in inputs if node_name(i) not in numbers]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        attrs = tuple(sorted((k, v.SerializeToString(deterministic=True))
                             for k, v in node.attr.items() if not k.startswith("_")))
        key = (node.op, attrs, name if by_name else tuple(_tensor_number(numbers, i) for i in inputs))
        numbers[name] = keys.setdefault(key, len(keys))
    return numbers


def _tensor_number(numbers, tensor):
    """A tensor's value: its node's value number and which output it is ('a' is 'a:0')."""
    return numbers[node_name(tensor)], tensor.partition(":")[2] or "0"


def share_equal_inputs(graph, sites):
    """Sites whose activations hold the same values get one tensor.

    Each Dense layer reshapes its input with nodes of its own (Tensordot), so q, k, v and fc_in,
    which all read the same layer norm, have four activation tensors. Once they read one, they
    share one calibration range and one QuantizeV2, and `fuse_int8_matmuls` gives them one kernel."""
    index = GraphIndex(graph.graph_def)
    numbers = _value_numbers(index, [s.activation for s in sites])
    first, shared = {}, []
    rw = _Rewriter(graph)
    for site in sites:
        tensor = first.setdefault(_tensor_number(numbers, site.activation), site.activation)
        if tensor != site.activation:
            rw.replace_input(site.matmul, 0, tensor)
            site = dataclasses.replace(site, activation=tensor)
        shared.append(site)
    return rw.finish(), shared


def find_pair_inputs(graph, ops):
    """(node, input index, tensor) of every float data input of the nodes of type `ops`."""
    index = GraphIndex(graph.graph_def)
    found = []
    for node in graph.graph_def.node:
        if node.op not in ops or node.attr["T"].type != tf.float32.as_datatype_enum:
            continue
        n_data = node.attr["N"].i if node.op == "ConcatV2" else len(node.input)
        for i, tensor in enumerate(node.input[:n_data]):
            if not tensor.startswith("^") and index.producer(tensor).op != "Const":
                found.append((node.name, i, tensor))
    return found


def find_embeddings(graph):
    """(ResourceGather node, placeholder) for embedding lookups of a float weight variable."""
    index = GraphIndex(graph.graph_def)
    found = []
    for node in graph.graph_def.node:
        if node.op == "ResourceGather" and node.attr["dtype"].type == tf.float32.as_datatype_enum:
            holder = index.through_identity(node.input[0]).name
            if isinstance(graph.feeds.get(holder), tf.Variable):
                found.append((node.name, holder))
    return found


##### Quantization primitives #####


def _cpu_has_vnni():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


# Without VNNI, oneDNN's u8 x s8 kernels add pairs of products in int16 (vpmaddubsw), which
# saturates once 2 * 255 * 127 > 32767. Activations then use 128 levels, 2 * 127 * 127 fits.
ACTIVATION_LEVELS = 256 if _cpu_has_vnni() else 128


def activation_range(lo, hi):
    """A calibrated range that holds zero and is never empty."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-6:
        hi = lo + 1e-6
    return lo, hi


def _row_blocks(w, block_elements=1 << 24):
    """(start, stop) of blocks of rows of `w` holding at most `block_elements` values each."""
    rows = max(1, block_elements // max(1, int(np.prod(w.shape[1:]))))
    return [(i, min(i + rows, w.shape[0])) for i in range(0, w.shape[0], rows)]


def _read(w, i, j):
    return np.asarray(w[i:j], np.float32)


def absolute_max(w, axis=None, block_elements=1 << 24):
    """max |w| of the whole tensor (axis=None), of each row (axis=1) or of each column (axis=0),
    read in blocks of rows."""
    blocks = _row_blocks(w, block_elements)
    if axis is None:
        return np.float32(max(float(np.abs(_read(w, i, j)).max()) for i, j in blocks))
    if axis == 1:
        return np.concatenate([np.abs(_read(w, i, j)).max(axis=1) for i, j in blocks])
    out = np.zeros(w.shape[1], np.float32)
    for i, j in blocks:
        out = np.maximum(out, np.abs(_read(w, i, j)).max(axis=0))
    return out


def quantize_symmetric(w, axis=None, block_elements=1 << 24):
    """int8 weights in [-127, 127] and the absolute maximum they scale to: one for the whole
    tensor (axis=None), one per row (axis=1, reduced along the row) or one per column (axis=0).

    `w` is a numpy array, a tf.Variable or anything with `.shape` and row slicing, read in blocks
    of rows (64 MB of float32 at most), so a 50400 x 4096 embedding is never copied whole, nor has
    a full-size temporary beside it."""
    absmax = np.maximum(absolute_max(w, axis, block_elements), np.float32(1e-8)).astype(np.float32)
    q = np.empty(w.shape, np.int8)
    for i, j in _row_blocks(w, block_elements):
        if axis is None:
            scale = np.float32(127.0) / absmax
        elif axis == 1:
            scale = np.float32(127.0) / absmax[i:j, None]
        else:
            scale = np.float32(127.0) / absmax[None, :]
        q[i:j] = np.clip(np.rint(_read(w, i, j) * scale), -127, 127)
    return q, absmax


def compensated_int32_bias(bias, q_weight, weight_absmax, lo, hi):
    """The qint32 bias of a u8 (MIN_FIRST) x s8 matmul: the float bias in accumulator units plus
    the activation's zero point times each column's weight sum, which the kernel cannot see."""
    scale_a = 255.0 / (hi - lo)
    scale_w = 127.0 / float(weight_absmax)
    column_sums = q_weight.sum(axis=0, dtype=np.int64).astype(np.float64)
    return np.rint(bias.astype(np.float64) * scale_a * scale_w + column_sums * np.rint(lo * scale_a)).astype(np.int32)


##### SmoothQuant #####


class _ScaledRows:
    """A weight whose row k reads multiplied by scale[k], block by block."""

    def __init__(self, weight, scale):
        self.weight, self.scale, self.shape = weight, scale, tuple(weight.shape)

    def __getitem__(self, rows):
        return np.asarray(self.weight[rows], np.float32) * self.scale[rows, None]


def smooth_activations(graph, sites, ranges, alpha):
    """SmoothQuant: move activation outliers into the weights.

    Each tensor entering MatMuls gets channel k divided by
    s_k = max|x_k|^alpha / max|w_k|^(1 - alpha) (max over the rows k of all weights it feeds) by a
    Mul in the graph, and those weights get row k multiplied by s_k when they are quantized.
    The product is unchanged; the activation's range, which int8 must cover, shrinks.
    Returns the graph, the sites (now fed by the smoothed tensors) and their ranges."""
    rw = _Rewriter(graph)
    channels, ranges = ranges.channels, dict(ranges)
    groups = {}
    for site in sites:
        groups.setdefault(site.activation, []).append(site)
    smoothed = []
    for activation, group in groups.items():
        lo, hi = channels[activation]
        x_max = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
        w_max = np.max([absolute_max(rw.graph.feeds[s.weight], axis=1) for s in group], axis=0).astype(np.float64)
        scale = np.where((x_max > 0) & (w_max > 0),
                         x_max ** alpha / np.maximum(w_max, 1e-8) ** (1 - alpha), 1.0)
        scale = np.clip(scale, 1e-5, 1e5).astype(np.float32)
        name = f"{node_name(activation)}/smooth"
        rw.add(make_const(f"{name}/inverse_scale", (1.0 / scale).astype(np.float32), tf.float32),
               make_node("Mul", name, [activation, f"{name}/inverse_scale"], T=tf.float32))
        ranges[name] = (float((lo / scale).min()), float((hi / scale).max()))
        for site in group:
            rw.replace_input(site.matmul, 0, name)
            smoothed.append(dataclasses.replace(site, activation=name, row_scale=scale))
    return rw.finish(), smoothed, ranges


##### Graph rewriting #####


class _Rewriter:
    """Edits a ServingGraph's GraphDef and feeds in place; nodes are replaced by name."""

    def __init__(self, graph):
        self.graph = graph
        self.nodes = {n.name: n for n in graph.graph_def.node}

    def add(self, *nodes):
        for node in nodes:
            self.nodes[node.name] = node

    def replace_input(self, consumer, index, tensor):
        self.nodes[consumer].input[index] = tensor

    def add_int8_variable(self, name, values):
        """A new int8 (or small float) variable, bound to a placeholder `name`; returns its read."""
        self.graph.feeds[name] = tf.Variable(values, trainable=False, name=name.replace("/", "_"))
        dtype = tf.as_dtype(values.dtype)
        self.add(make_resource_placeholder(name),
                 make_node("ReadVariableOp", f"{name}/read", [name], dtype=dtype))
        return f"{name}/read"

    def qdq_pair(self, prefix, tensor, lo, hi):
        """QuantizeV2 -> Dequantize of `tensor` (symmetric qint8); returns the dequantized tensor."""
        bound = max(abs(lo), abs(hi))
        self.add(make_const(f"{prefix}/min", -bound, tf.float32),
                 make_const(f"{prefix}/max", bound, tf.float32),
                 make_node("QuantizeV2", f"{prefix}/quantize", [tensor, f"{prefix}/min", f"{prefix}/max"],
                           T=tf.qint8, mode="SCALED", round_mode="HALF_TO_EVEN", ensure_minimum_range=0.0),
                 make_node("Dequantize", f"{prefix}/dequantize",
                           [f"{prefix}/quantize", f"{prefix}/quantize:1", f"{prefix}/quantize:2"],
                           T=tf.qint8, mode="SCALED", dtype=tf.float32))
        return f"{prefix}/dequantize"

    def finish(self):
        del self.graph.graph_def.node[:]
        self.graph.graph_def.node.extend(self.nodes.values())
        return self.graph


def _weight_int8(rw, site, per_channel):
    """One weight variable quantized to int8, per tensor or per output column (only this weight is
    read, in blocks); returns the int8 values and the absolute maximum(s) they scale to."""
    weight = rw.graph.feeds[site.weight]
    if site.row_scale is not None:
        weight = _ScaledRows(weight, site.row_scale)
    return quantize_symmetric(weight, axis=0 if per_channel else None)


def fuse_int8_matmuls(graph, sites, ranges, per_channel=False):
    """The MatMuls (+ BiasAdds) that read one activation become one `_QuantizedMatMul`
    u8 x s8 -> float, on their weights side by side, split back into their outputs.

    One kernel for q, k, v and fc_in instead of four saves the per-call cost of each and runs
    oneDNN's int8 GEMM on a wider matrix, where it is faster. The kernel takes one weight scale:
    each weight is quantized (per column, or whole) to the full int8 range, the kernel is told
    the largest scale, and a Mul by each column's share of it follows when the scales differ
    (the bias is divided by the same share, so the Mul restores it too)."""
    rw = _Rewriter(graph)
    groups = {}
    for site in sites:
        groups.setdefault(site.activation, []).append(site)
    log.info("%d MatMuls -> %d int8 kernels", len(sites), len(groups))
    for activation, group in groups.items():
        lo, hi = activation_range(*ranges[activation])
        hi = lo + (hi - lo) * 255.0 / (ACTIVATION_LEVELS - 1)   # the u8 range that gives those levels
        weights = [_weight_int8(rw, site, per_channel) for site in group]
        widths = [q.shape[1] for q, _ in weights]
        q = weights[0][0] if len(group) == 1 else np.concatenate([q for q, _ in weights], axis=1)
        absmax = np.concatenate([np.broadcast_to(a, (n,)) for (_, a), n in zip(weights, widths)])
        del weights
        bias = np.concatenate([rw.graph.feeds[s.bias].numpy() if s.bias else np.zeros(n, np.float32)
                               for s, n in zip(group, widths)])
        top = float(np.max(absmax))
        share = absmax / top
        scaled = bool(np.any(share != 1.0))
        name = group[0].matmul if len(group) == 1 else f"{node_name(activation)}/int8_matmul"
        kernel = f"{name}/int8" if scaled else name
        # one QuantizeV2 per tensor
        quantized = f"{node_name(activation)}/quantize_u8"
        read = rw.add_int8_variable(f"{name}/weight_int8", q)
        rw.add(make_const(f"{quantized}/min", lo, tf.float32),
               make_const(f"{quantized}/max", hi, tf.float32),
               make_node("QuantizeV2", quantized, [activation, f"{quantized}/min", f"{quantized}/max"],
                         T=tf.quint8, mode="MIN_FIRST", ensure_minimum_range=0.0),
               make_node("Bitcast", f"{name}/weight_qint8", [read], T=tf.int8, type=tf.qint8),
               make_const(f"{name}/bias_int32", compensated_int32_bias(bias / share, q, top, lo, hi), tf.qint32),
               make_const(f"{name}/min_b", -top, tf.float32),
               make_const(f"{name}/max_b", top, tf.float32),
               make_node("_QuantizedMatMul", kernel,
                         [quantized, f"{name}/weight_qint8", f"{name}/bias_int32",
                          f"{quantized}:1", f"{quantized}:2", f"{name}/min_b", f"{name}/max_b"],
                         T1=tf.quint8, T2=tf.qint8, Tbias=tf.qint32, Tout=tf.float32, U=tf.float32,
                         Tdevice_inputs=[], Tdevice_outputs=[],
                         Thost_inputs=[tf.quint8, tf.qint8, tf.qint32] + [tf.float32] * 4,
                         Thost_outputs=[tf.float32], fused_ops=["BiasAdd", "Dequantize"],
                         input_quant_mode="MIN_FIRST", output_quant_mode="SCALED",
                         transpose_a=False, transpose_b=False, is_weight_const=True, is_bias_const=True))
        if scaled:
            rw.add(make_const(f"{name}/column_scale", share.astype(np.float32), tf.float32),
                   make_node("Mul", name, [kernel, f"{name}/column_scale"], T=tf.float32))
        if len(group) > 1:
            rw.add(make_const(f"{name}/widths", widths, tf.int32),
                   make_const(f"{name}/last_axis", -1, tf.int32),
                   make_node("SplitV", f"{name}/split", [name, f"{name}/widths", f"{name}/last_axis"],
                             T=tf.float32, Tlen=tf.int32, num_split=len(group)))
            for i, site in enumerate(group):
                rw.add(make_node("Identity", site.matmul, [f"{name}/split:{i}"], T=tf.float32))
        for site in group:
            if site.bias_add:   # the bias now lives in the fused kernel
                old = rw.nodes[site.bias_add]
                rw.add(make_node("Identity", site.bias_add, [old.input[0]], T=tf.float32))
    return rw.finish()


def insert_qdq_pairs(graph, sites, ranges, per_channel=False):
    """QDQ before each site's MatMul activation; the weight stored int8, dequantized in-graph."""
    rw = _Rewriter(graph)
    for site in sites:
        lo, hi = activation_range(*ranges[site.activation])
        rw.replace_input(site.matmul, 0, rw.qdq_pair(f"{site.matmul}/input", site.activation, lo, hi))
        q, absmax = _weight_int8(rw, site, per_channel)
        name = site.matmul
        read = rw.add_int8_variable(f"{name}/weight_int8", q)
        rw.add(make_node("Bitcast", f"{name}/weight_qint8", [read], T=tf.int8, type=tf.qint8),
               make_const(f"{name}/min_b", -absmax, tf.float32),
               make_const(f"{name}/max_b", absmax, tf.float32),
               make_node("Dequantize", f"{name}/weight_dequantize",
                         [f"{name}/weight_qint8", f"{name}/min_b", f"{name}/max_b"],
                         T=tf.qint8, mode="SCALED", dtype=tf.float32, axis=1 if per_channel else -1))
        rw.replace_input(site.matmul, 1, f"{name}/weight_dequantize")
    return rw.finish()


def insert_input_pairs(graph, inputs, ranges):
    """QDQ pairs on (node, input index, tensor) triples, e.g. the float ConcatV2 inputs."""
    rw = _Rewriter(graph)
    for node, i, tensor in inputs:
        lo, hi = activation_range(*ranges[tensor])
        rw.replace_input(node, i, rw.qdq_pair(f"{node}/input_{i}", tensor, lo, hi))
    return rw.finish()


def quantize_embeddings(graph, embeddings):
    """Embedding tables stored int8 with one scale per row; rows are dequantized after the lookup."""
    rw = _Rewriter(graph)
    for gather, holder in embeddings:
        q, absmax = quantize_symmetric(rw.graph.feeds[holder], axis=1)
        old = rw.nodes[gather]
        rw.add_int8_variable(f"{gather}/table_int8", q)
        rw.add_int8_variable(f"{gather}/row_scale", (absmax / 127.0).astype(np.float32))
        indices = old.input[1]
        attrs = {"batch_dims": old.attr["batch_dims"].i, "validate_indices": old.attr["validate_indices"].b,
                 "Tindices": tf.as_dtype(old.attr["Tindices"].type)}
        rw.add(make_node("ResourceGather", f"{gather}/rows_int8", [f"{gather}/table_int8", indices],
                         dtype=tf.int8, **attrs),
               make_node("ResourceGather", f"{gather}/scales", [f"{gather}/row_scale", indices],
                         dtype=tf.float32, **attrs),
               make_node("Cast", f"{gather}/rows", [f"{gather}/rows_int8"], SrcT=tf.int8, DstT=tf.float32,
                         Truncate=False),
               make_const(f"{gather}/last_axis", -1, tf.int32),
               make_node("ExpandDims", f"{gather}/scales_column", [f"{gather}/scales", f"{gather}/last_axis"],
                         T=tf.float32, Tdim=tf.int32),
               make_node("Mul", gather, [f"{gather}/rows", f"{gather}/scales_column"], T=tf.float32))
    return rw.finish()
