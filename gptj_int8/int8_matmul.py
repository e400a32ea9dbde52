"""The default form: QDQ + MatMul (+ BiasAdd) fused into TensorFlow's oneDNN `_QuantizedMatMul`,
u8 activations x s8 weights -> float, the weight read from an int8 variable and kept reordered
by oneDNN between calls (`is_weight_const`)."""
import numpy as np
import tensorflow as tf

from .graph import Rewriter, make_const, make_node, node_name
from .weights import compensated_int32_bias, u8_activation_range


def kernel_groups(graph, sites):
    """{activation: [sites]}: the MatMuls that become one kernel, those reading one tensor, each
    group in the order of its variables' names, so every signature asks the store for the same
    side-by-side weight."""
    groups = {}
    for site in sorted(sites, key=lambda s: graph.feeds[s.weight].name):
        groups.setdefault(site.activation, []).append(site)
    return groups


def fuse_int8_matmuls(graph, sites, ranges, store):
    """The MatMuls (+ BiasAdds) that read one activation become one `_QuantizedMatMul`
    u8 x s8 -> float, on their weights side by side (from `store`, a weights.Int8Weights), split
    back into their outputs.

    One kernel for q, k, v and fc_in instead of four saves the per-call cost of each and runs
    oneDNN's int8 GEMM on a wider matrix, where it is faster. The kernel takes each column's
    weight scale (min_b/max_b as vectors: oneDNN's per-output-channel scales), so nothing follows
    it but the split."""
    rw = Rewriter(graph)
    for activation, group in kernel_groups(graph, sites).items():
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
               make_node("QuantizeV2", quantized, [activation, f"{quantized}/min", f"{quantized}/max"],
                         T=tf.quint8, mode="MIN_FIRST", ensure_minimum_range=0.0),
               make_node("Bitcast", f"{name}/weight_qint8", [read], T=tf.int8, type=tf.qint8),
               make_const(f"{name}/bias_int32", compensated_int32_bias(bias, column_sums, absmax, lo, hi),
                          tf.qint32),
               make_const(f"{name}/min_b", -absmax, tf.float32),
               make_const(f"{name}/max_b", absmax, tf.float32),
               make_node("_QuantizedMatMul", name,
                         [quantized, f"{name}/weight_qint8", f"{name}/bias_int32",
                          f"{quantized}:1", f"{quantized}:2", f"{name}/min_b", f"{name}/max_b"],
                         T1=tf.quint8, T2=tf.qint8, Tbias=tf.qint32, Tout=tf.float32, U=tf.float32,
                         Tdevice_inputs=[], Tdevice_outputs=[],
                         Thost_inputs=[tf.quint8, tf.qint8, tf.qint32] + [tf.float32] * 4,
                         Thost_outputs=[tf.float32], fused_ops=["BiasAdd", "Dequantize"],
                         input_quant_mode="MIN_FIRST", output_quant_mode="SCALED",
                         transpose_a=False, transpose_b=False, is_weight_const=True, is_bias_const=True))
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
