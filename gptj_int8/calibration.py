"""Calibration: run passages through the serving graph and keep running min/max per tensor.

The reductions run inside the graph, so each batch returns two floats per tensor, never the
activations themselves, and memory does not grow with the number of tensors or batches.
"""
import logging

import numpy as np
import tensorflow as tf
from tqdm import tqdm

log = logging.getLogger(__name__)


def collect_activation_ranges(graph, tensors, batches):
    """{tensor name: (min, max)} over all `batches` of (input_ids, attention_mask, ...)."""
    tensors = sorted(set(tensors))
    run = graph.function(fetches=tensors)

    @tf.function(autograph=False)
    def extremes(input_ids, attention_mask):
        values = run(input_ids, attention_mask)
        return (tf.stack([tf.reduce_min(v) for v in values]),
                tf.stack([tf.reduce_max(v) for v in values]))

    lo = np.full(len(tensors), np.inf, np.float64)
    hi = np.full(len(tensors), -np.inf, np.float64)
    for input_ids, attention_mask, *_ in tqdm(batches, desc="calibrating", unit="batch"):
        b_lo, b_hi = extremes(tf.constant(input_ids), tf.constant(attention_mask))
        lo = np.minimum(lo, b_lo.numpy())
        hi = np.maximum(hi, b_hi.numpy())
    if not np.isfinite(lo).all():
        raise ValueError("calibration saw no batches")
    return {t: (float(a), float(b)) for t, a, b in zip(tensors, lo, hi)}
