"""Calibration: run passages through the serving graph and keep running min/max per tensor.

The reductions run inside the graph, so each batch returns a few numbers per channel of each
tensor, never the activations themselves, and memory does not grow with the number of tensors
or batches.
"""
import logging

import numpy as np
import tensorflow as tf
from tqdm import tqdm

log = logging.getLogger(__name__)


class Ranges(dict):
    """{tensor name: (min, max)} over the whole tensor; `.channels[name]` holds (min, max)
    vectors over its last axis (SmoothQuant needs them)."""

    def __init__(self, channels):
        self.channels = channels
        super().__init__({t: (float(lo.min()), float(hi.max())) for t, (lo, hi) in channels.items()})


def _merge(pick, seen, batch):
    """Channel-wise extreme; a tensor whose last axis changes with the input (attention scores
    over the sequence) has no fixed channels and keeps a single value."""
    if seen.shape != batch.shape:
        return pick(pick.reduce(seen, keepdims=True), pick.reduce(batch, keepdims=True))
    return pick(seen, batch)


def collect_activation_ranges(graph, tensors, batches):
    """Ranges of `tensors` over all `batches` of (input_ids, attention_mask, ...)."""
    tensors = sorted(set(tensors))
    run = graph.function(fetches=tensors)

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)] * 2, autograph=False)
    def extremes(input_ids, attention_mask):
        values = run(input_ids, attention_mask)
        flat = [tf.reshape(v, [-1, tf.shape(v)[-1]]) for v in values]
        return [tf.reduce_min(v, axis=0) for v in flat], [tf.reduce_max(v, axis=0) for v in flat]

    lo, hi = None, None
    for input_ids, attention_mask, *_ in tqdm(batches, desc="calibrating", unit="batch"):
        b_lo, b_hi = extremes(tf.constant(input_ids), tf.constant(attention_mask))
        b_lo, b_hi = [v.numpy() for v in b_lo], [v.numpy() for v in b_hi]
        lo = b_lo if lo is None else [_merge(np.minimum, a, b) for a, b in zip(lo, b_lo)]
        hi = b_hi if hi is None else [_merge(np.maximum, a, b) for a, b in zip(hi, b_hi)]
    if lo is None:
        raise ValueError("calibration saw no batches")
    return Ranges({t: (a, b) for t, a, b in zip(tensors, lo, hi)})
