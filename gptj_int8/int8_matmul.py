"""The default form: QDQ + MatMul (+ BiasAdd) fused into one of TensorFlow's oneDNN int8 kernels,
u8 activations x s8 weights, the weight read from an int8 variable and kept reordered by oneDNN
between calls. Two kernels compute the product:

    matmul  `_QuantizedMatMul`, oneDNN's inner product: u8 x s8 -> float in one op
            (`is_weight_const`).
    conv    `_FusedQuantizedConv2D` as a 1x1 convolution: the activation [M, K] as an NHWC image
            [1, 1, M, K], the weight as a filter [1, 1, K, N] (`is_filter_const`), int32 out,
            then each column's scale. oneDNN runs it through its convolution kernels, which at a
            few rows stream the weight at memory bandwidth where the inner product does not.

Both read the same int8 variable [K, N] (one copy on disk for every signature and form) and the
same compensated int32 bias, so their int32 accumulators are identical."""
import numpy as np
import tensorflow as tf

from .graph import Rewriter, make_const, make_node, node_name
from .weights import compensated_int32_bias, u8_activation_range

MATMUL, CONV = "matmul", "conv"
FORMS = (MATMUL, CONV)
KERNEL_OPS = {MATMUL: "_QuantizedMatMul", CONV: "_FusedQuantizedConv2D"}
# The form every group takes when none is chosen (--force_int8): the convolution, the faster of the
# two at every shape measured on AVX2 (at one row by 2-4x, at 128 rows by 5-15%).
DEFAULT_FORM = CONV


def kernel_output(node):
    """The name of the float [M, N] output of an int8 kernel node (an op of KERNEL_OPS): the inner
    product's own, the convolution's after its column scale."""
    return node.name if node.op == KERNEL_OPS[MATMUL] else f"{node.name.rsplit('/', 1)[0]}/scaled"


def kernel_groups(graph, sites):
    """{activation: [sites]}: the MatMuls that become one kernel, those reading one tensor, each
    group in the order of its variables' names, so every signature asks the store for the same
    side-by-side weight."""
    groups = {}
    for site in sorted(sites, key=lambda s: graph.feeds[s.weight].name):
        groups.setdefault(site.activation, []).append(site)
    return groups


def fuse_int8_matmuls(graph, sites, ranges, store, forms=None):
    """The MatMuls (+ BiasAdds) that read one activation become one int8 kernel u8 x s8 -> float,
    on their weights side by side (from `store`, a weights.Int8Weights), split back into their
    outputs. `forms` is one of FORMS for every group, or {activation: form} (DEFAULT_FORM where
    absent).

    One kernel for q, k, v and fc_in instead of four saves the per-call cost of each and runs
    oneDNN's int8 kernels on a wider matrix, where they are faster. Each column has its own weight
    scale: the matmul takes them as min_b/max_b vectors (oneDNN's per-output-channel scales); the
    convolution's int32 result is multiplied by them, with the activation's scale, after it."""
    rw = Rewriter(graph)
    for activation, group in kernel_groups(graph, sites).items():
        form = forms if isinstance(forms, str) else (forms or {}).get(activation, DEFAULT_FORM)
        lo, hi = u8_activation_range(*ranges[activation])
        weight, absmax, column_sums = store.matmul(rw.graph, group)
        widths = [int(rw.graph.feeds[s.weight].shape[1]) for s in group]
        bias = np.concatenate([rw.graph.feeds[s.bias].numpy() if s.bias else np.zeros(n, np.float32)
                               for s, n in zip(group, widths)])
        if np.all(absmax == absmax[0]):
            absmax = absmax[:1].reshape(())   # one scale for the whole matrix
        name = group[0].matmul if len(group) == 1 else f"{node_name(activation)}/int8_matmul"
        # one QuantizeV2 per tensor
        quantized = f"{node_name(activation)}/quantize_u8"
        read = rw.read_variable(f"{name}/weight_int8", weight)
        rw.add(make_const(f"{quantized}/min", lo, tf.float32),
               make_const(f"{quantized}/max", hi, tf.float32),
               # narrow_range: MIN_FIRST ignores it (the same u8 values), but TensorFlow's oneDNN layout
               # pass (TF_ENABLE_ONEDNN_OPTS=1) then leaves the op alone instead of making it a
               # _MklQuantizeV2, which costs ~0.1 ms a call at any size (13 calls a token on the
               # bundled model)
               make_node("QuantizeV2", quantized, [activation, f"{quantized}/min", f"{quantized}/max"],
                         T=tf.quint8, mode="MIN_FIRST", ensure_minimum_range=0.0, narrow_range=True),
               make_const(f"{name}/bias_int32", compensated_int32_bias(bias, column_sums, absmax, lo, hi),
                          tf.qint32))
        kernel = {MATMUL: _matmul_kernel, CONV: _conv_kernel}[form]
        out = kernel(rw, name, quantized, read, f"{name}/bias_int32", absmax, (hi - lo) / 255.0,
                     (int(rw.graph.feeds[group[0].weight].shape[0]), sum(widths)))
        if len(group) > 1:
            rw.add(make_const(f"{name}/widths", widths, tf.int32),
                   make_const(f"{name}/last_axis", -1, tf.int32),
                   make_node("SplitV", f"{name}/split", [out, f"{name}/widths", f"{name}/last_axis"],
                             T=tf.float32, Tlen=tf.int32, num_split=len(group)))
            for i, site in enumerate(group):
                rw.add(make_node("Identity", site.matmul, [f"{name}/split:{i}"], T=tf.float32))
        elif out != name:
            rw.add(make_node("Identity", name, [out], T=tf.float32))
        for site in group:
            if site.bias_add:   # the bias now lives in the fused kernel
                old = rw.nodes[site.bias_add]
                rw.add(make_node("Identity", site.bias_add, [old.input[0]], T=tf.float32))
    return rw.finish()


def _matmul_kernel(rw, name, quantized, read, bias, absmax, step_a, shape):
    """`_QuantizedMatMul` u8 x s8 + int32 bias -> float [M, N], dequantized inside the kernel."""
    rw.add(make_node("Bitcast", f"{name}/weight_qint8", [read], T=tf.int8, type=tf.qint8),
           make_const(f"{name}/min_b", -absmax, tf.float32),
           make_const(f"{name}/max_b", absmax, tf.float32),
           make_node("_QuantizedMatMul", name,
                     [quantized, f"{name}/weight_qint8", bias,
                      f"{quantized}:1", f"{quantized}:2", f"{name}/min_b", f"{name}/max_b"],
                     T1=tf.quint8, T2=tf.qint8, Tbias=tf.qint32, Tout=tf.float32, U=tf.float32,
                     Tdevice_inputs=[], Tdevice_outputs=[],
                     Thost_inputs=[tf.quint8, tf.qint8, tf.qint32] + [tf.float32] * 4,
                     Thost_outputs=[tf.float32], fused_ops=["BiasAdd", "Dequantize"],
                     input_quant_mode="MIN_FIRST", output_quant_mode="SCALED",
                     transpose_a=False, transpose_b=False, is_weight_const=True, is_bias_const=True))
    return name


def _conv_kernel(rw, name, quantized, read, bias, absmax, step_a, shape):
    """`_FusedQuantizedConv2D` 1x1: u8 [1, 1, M, K] x s8 [1, 1, K, N] + int32 bias -> int32, then
    float [M, N] by each column's scale, step_a * absmax / 127.

    The kernel rescales a qint32 bias by the ranges of its input and filter; given input [0, 1]
    and filter [-1, 1] it adds the bias as it is, and with an int32 output the ranges change
    nothing else: it returns exactly sum(q_a * q_w) + bias (tests/test_kernels.py checks this
    against int64 arithmetic)."""
    depth, width = shape
    rw.add(make_const(f"{name}/image_dims", [1, 1, -1, depth], tf.int32),
           make_node("Reshape", f"{name}/image", [quantized, f"{name}/image_dims"], T=tf.quint8, Tshape=tf.int32),
           make_const(f"{name}/filter_dims", [1, 1, depth, width], tf.int32),
           make_node("Reshape", f"{name}/filter_int8", [read, f"{name}/filter_dims"], T=tf.int8, Tshape=tf.int32),
           make_node("Bitcast", f"{name}/filter_qint8", [f"{name}/filter_int8"], T=tf.int8, type=tf.qint8),
           make_const(f"{name}/unit_min", 0.0, tf.float32), make_const(f"{name}/unit_max", 1.0, tf.float32),
           make_const(f"{name}/symmetric_min", -1.0, tf.float32),
           make_node("_FusedQuantizedConv2D", f"{name}/kernel",
                     [f"{name}/image", f"{name}/filter_qint8", bias, f"{name}/unit_min", f"{name}/unit_max",
                      f"{name}/symmetric_min", f"{name}/unit_max"],
                     Tinput=tf.quint8, Tfilter=tf.qint8, Tbias=tf.qint32, Tsummand=tf.qint32, out_type=tf.qint32,
                     Tdevice_inputs=[], Tdevice_outputs=[],
                     Thost_inputs=[tf.quint8, tf.qint8, tf.qint32] + [tf.float32] * 4,
                     Thost_outputs=[tf.qint32, tf.float32, tf.float32], fused_ops=["BiasAdd"],
                     strides=[1, 1, 1, 1], padding="VALID", is_filter_const=True, is_bias_const=True),
           make_node("Bitcast", f"{name}/int32", [f"{name}/kernel"], T=tf.qint32, type=tf.int32),
           make_const(f"{name}/rows_dims", [-1, width], tf.int32),
           make_node("Reshape", f"{name}/rows_int32", [f"{name}/int32", f"{name}/rows_dims"],
                     T=tf.int32, Tshape=tf.int32),
           make_node("Cast", f"{name}/rows", [f"{name}/rows_int32"], SrcT=tf.int32, DstT=tf.float32, Truncate=False),
           make_const(f"{name}/column_scale", (step_a * np.asarray(absmax, np.float64) / 127.0).astype(np.float32),
                      tf.float32),
           make_node("Mul", f"{name}/scaled", [f"{name}/rows", f"{name}/column_scale"], T=tf.float32))
    return f"{name}/scaled"
