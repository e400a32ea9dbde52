"""SmoothQuant: move activation outliers into the weights before both are quantized."""
import dataclasses

import numpy as np
import tensorflow as tf

from .graph import Rewriter, make_const, make_node, node_name
from .weights import absolute_max


def smoothing_scales(graph, sites, ranges, alpha, cache=None):
    """{activation: s} with s_k = max|x_k|^alpha / max|w_k|^(1 - alpha), the max over the rows k
    of all weights the activation feeds. `cache` (keyed by those weight variables) lets other
    signatures of the model reuse the scales, and so the same smoothed int8 weights."""
    cache = {} if cache is None else cache
    groups = {}
    for site in sites:
        groups.setdefault(site.activation, []).append(site)
    scales = {}
    for activation, group in groups.items():
        key = tuple(sorted(id(graph.feeds[s.weight]) for s in group))
        if key not in cache:
            lo, hi = ranges.channels[activation]
            x_max = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
            w_max = np.max([absolute_max(graph.feeds[s.weight], axis=1) for s in group], axis=0).astype(np.float64)
            scale = np.where((x_max > 0) & (w_max > 0),
                             x_max ** alpha / np.maximum(w_max, 1e-8) ** (1 - alpha), 1.0)
            cache[key] = np.clip(scale, 1e-5, 1e5).astype(np.float32)
        scales[activation] = cache[key]
    return scales


def smooth_activations(graph, sites, ranges, alpha, cache=None):
    """SmoothQuant: each tensor entering MatMuls gets channel k divided by s_k (smoothing_scales)
    by a Mul in the graph, and the weights it feeds get row k multiplied by s_k when they are
    quantized. The product is unchanged; the activation's range, which int8 must cover, shrinks.
    Returns the graph, the sites (their activation now the smoothed tensor) and their ranges.

    The MatMuls themselves still read the unsmoothed tensor: only an int8 kernel or QDQ pair built
    for a site reads the smoothed one, beside the weight scaled to match. A MatMul that stays FP32
    (slower in int8 on this CPU, --keep_fp32, the accuracy-aware fallback) keeps its FP32 weight and
    so must keep its input as it was."""
    scales = smoothing_scales(graph, sites, ranges, alpha, cache)
    rw = Rewriter(graph)
    smoothed_ranges = dict(ranges)
    smoothed = []
    for activation, scale in scales.items():
        lo, hi = ranges.channels[activation]
        name = f"{node_name(activation)}/smooth"
        rw.add(make_const(f"{name}/inverse_scale", (1.0 / scale).astype(np.float32), tf.float32),
               make_node("Mul", name, [activation, f"{name}/inverse_scale"], T=tf.float32))
        smoothed_ranges[name] = (float((lo / scale).min()), float((hi / scale).max()))
        smoothed += [dataclasses.replace(site, activation=name, row_scale=scale)
                     for site in sites if site.activation == activation]
    return rw.finish(), smoothed, smoothed_ranges
