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
    """Ranges of `tensors` over all `batches`; a batch is a tuple whose first items are the
    graph's inputs, in order (further items, such as target lengths, are ignored)."""
    tensors = sorted(set(tensors))
    run = graph.function(fetches=tensors)
    n_inputs = len(graph.inputs)

    @tf.function(input_signature=list(graph.specs), autograph=False)
    def extremes(*inputs):
        values = run(*inputs)
        flat = [tf.reshape(v, [-1, tf.shape(v)[-1]]) for v in values]
        return [tf.reduce_min(v, axis=0) for v in flat], [tf.reduce_max(v, axis=0) for v in flat]

    lo, hi = None, None
    for batch in tqdm(batches, desc="calibrating", unit="batch"):
        b_lo, b_hi = extremes(*map(tf.constant, batch[:n_inputs]))
        b_lo, b_hi = [v.numpy() for v in b_lo], [v.numpy() for v in b_hi]
        lo = b_lo if lo is None else [_merge(np.minimum, a, b) for a, b in zip(lo, b_lo)]
        hi = b_hi if hi is None else [_merge(np.maximum, a, b) for a, b in zip(hi, b_hi)]
    if lo is None:
        raise ValueError("calibration saw no batches")
    return Ranges({t: (a, b) for t, a, b in zip(tensors, lo, hi)})


# Where generation runs decode besides the last token: a short prompt's first steps, which attend to
# few positions and so more strongly to each (the softmax's largest values).
SHORT_CONTEXTS = (1, 7)


def decode_batches(prefill, batches):
    """Inputs of the decode signature, from calibration batches, at the positions generation runs
    it at: each passage's last token after the rest (first, the common step), its 2nd and 8th
    token after the ones before them, and the whole passage from an empty cache (the `generate`
    signature's prompt). The earlier tokens go through `prefill` (the FP32 signature) for the cache.
    The passages are right-padded: a batch of several is cut to its shortest passage. A generator:
    one cache at a time is held (a 6B model's is ~100 MB per passage)."""
    for input_ids, attention_mask, *_ in batches:
        n = int(attention_mask.sum(axis=1).min())
        if n < 2:
            continue
        input_ids, attention_mask = input_ids[:, :n], attention_mask[:, :n]
        for k in (n - 1, *(k for k in SHORT_CONTEXTS if k < n - 1)):
            first = prefill(input_ids=tf.constant(input_ids[:, :k]), attention_mask=tf.constant(attention_mask[:, :k]))
            cache = first["past_key_values"].numpy()
            yield input_ids[:, k:k + 1], attention_mask[:, :k + 1], cache
        yield input_ids, attention_mask, np.zeros(cache.shape[:4] + (0,) + cache.shape[5:], np.float32)


def activation_rows(graph, tensors, batch):
    """{tensor: rows} on one batch: the product of all of a tensor's dimensions but the last, the M
    of the matmul that reads it (a prefill's lm_head reads one row per passage, not one per token)."""
    tensors = sorted(set(tensors))
    run = graph.function(fetches=tensors)

    @tf.function(input_signature=list(graph.specs), autograph=False)
    def shapes(*inputs):
        return [tf.shape(v) for v in run(*inputs)]

    found = shapes(*map(tf.constant, batch[:len(graph.inputs)]))
    return {t: int(np.prod(s.numpy()[:-1])) for t, s in zip(tensors, found)}
