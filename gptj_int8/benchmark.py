"""Accuracy, agreement and latency of serving functions: one routine of each for every script."""
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm


def last_token_logits(fn, batch):
    """Logits at the position before each row's last token: the prediction of the last token."""
    input_ids, attention_mask = batch
    logits = fn(input_ids=tf.constant(input_ids), attention_mask=tf.constant(attention_mask))["logits"]
    before_last = attention_mask.sum(axis=1) - 2
    return logits.numpy()[np.arange(len(input_ids)), before_last]


def evaluate(fn, batches, desc="evaluating"):
    """(last-token logits of every passage [n, vocab], targets [n]), in passage order."""
    logits, targets = [], []
    for batch in tqdm(batches, desc=desc, unit="batch"):
        logits.append(last_token_logits(fn, batch))
        targets.append(batch[0][np.arange(len(batch[0])), batch[1].sum(axis=1) - 1])
    return np.concatenate(logits), np.concatenate(targets)


def time_models(fns, batches, warmup, iterations):
    """Seconds per call of each function, interleaved call by call over `batches` (cycled),
    so that a noisy machine slows every model alike."""
    def call(fn, batch):
        fn(input_ids=tf.constant(batch[0]), attention_mask=tf.constant(batch[1]))["logits"].numpy()

    for i in range(warmup):
        for fn in fns:
            call(fn, batches[i % len(batches)])
    seconds = [[] for _ in fns]
    for i in tqdm(range(iterations), desc="timing", unit="it"):
        for fn, out in zip(fns, seconds):
            start = time.perf_counter()
            call(fn, batches[i % len(batches)])
            out.append(time.perf_counter() - start)
    return [np.array(s) for s in seconds]


def logit_cosine(a, b):
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def argmax_agreement(a, b):
    return float(np.mean(a.reshape(-1, a.shape[-1]).argmax(-1) == b.reshape(-1, b.shape[-1]).argmax(-1)))
