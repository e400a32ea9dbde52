"""QuantizeV2/Dequantize pairs: the itex_mode form of the MatMuls, and the pairs before the other
inputs (float ConcatV2s; the attention BatchMatMulV2s under performance_only).

`insert_qdq_pairs` puts a pair before each MatMul's activation and stores its weight as int8,
dequantized in the graph. Intel Extension for TensorFlow fuses this pattern into int8 kernels;
stock TensorFlow runs it as written (fake quantization), and so it runs every other pair: it has
no int8 kernel for ConcatV2 or BatchMatMulV2.
"""
import numpy as np
import tensorflow as tf

from .graph import Rewriter, make_const, make_node
from .weights import activation_range


def _qdq_pair(rw, prefix, tensor, lo, hi):
    """QuantizeV2 -> Dequantize of `tensor` (symmetric qint8); returns the dequantized tensor."""
    bound = max(abs(lo), abs(hi))
    rw.add(make_const(f"{prefix}/min", -bound, tf.float32),
           make_const(f"{prefix}/max", bound, tf.float32),
           make_node("QuantizeV2", f"{prefix}/quantize", [tensor, f"{prefix}/min", f"{prefix}/max"],
                     T=tf.qint8, mode="SCALED", round_mode="HALF_TO_EVEN", ensure_minimum_range=0.0),
           make_node("Dequantize", f"{prefix}/dequantize",
                     [f"{prefix}/quantize", f"{prefix}/quantize:1", f"{prefix}/quantize:2"],
                     T=tf.qint8, mode="SCALED", dtype=tf.float32))
    return f"{prefix}/dequantize"


def insert_qdq_pairs(graph, sites, ranges, store):
    """QDQ before each site's MatMul activation; the weight stored int8 (from `store`, a
    weights.Int8Weights), dequantized in-graph, per column or whole as the store quantizes."""
    rw = Rewriter(graph)
    for site in sites:
        lo, hi = activation_range(*ranges[site.activation])
        rw.replace_input(site.matmul, 0, _qdq_pair(rw, f"{site.matmul}/input", site.activation, lo, hi))
        weight, absmax, _ = store.matmul(rw.graph, [site])
        name = site.matmul
        read = rw.read_variable(f"{name}/weight_int8", weight)
        per_column = store.per_channel
        bound = absmax if per_column else np.float32(absmax[0])
        rw.add(make_node("Bitcast", f"{name}/weight_qint8", [read], T=tf.int8, type=tf.qint8),
               make_const(f"{name}/min_b", -bound, tf.float32),
               make_const(f"{name}/max_b", bound, tf.float32),
               make_node("Dequantize", f"{name}/weight_dequantize",
                         [f"{name}/weight_qint8", f"{name}/min_b", f"{name}/max_b"],
                         T=tf.qint8, mode="SCALED", dtype=tf.float32, axis=1 if per_column else -1))
        rw.replace_input(site.matmul, 1, f"{name}/weight_dequantize")
    return rw.finish()


def insert_input_pairs(graph, inputs, ranges):
    """QDQ pairs on (node, input index, tensor) triples, e.g. the float ConcatV2 inputs."""
    rw = Rewriter(graph)
    for node, i, tensor in inputs:
        lo, hi = activation_range(*ranges[tensor])
        rw.replace_input(node, i, _qdq_pair(rw, f"{node}/input_{i}", tensor, lo, hi))
    return rw.finish()
