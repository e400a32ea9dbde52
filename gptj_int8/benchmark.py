"""Accuracy, agreement and latency of serving functions: one routine of each for every script."""
import time

import numpy as np
import tensorflow as tf
from tqdm import tqdm


def score_batch(fn, batch):
    """For each passage of a batch: the logits that predict its last token, whether that argmax
    is the last token (the original example's metric), and whether every token of the last word
    is the argmax at its position (LAMBADA's last-word metric, greedy, as lm-evaluation-harness)."""
    input_ids, attention_mask, word_lengths = batch
    logits = fn(input_ids=tf.constant(input_ids), attention_mask=tf.constant(attention_mask))["logits"].numpy()
    lengths = attention_mask.sum(axis=1)
    rows = np.arange(len(input_ids))
    last = logits[rows, lengths - 2]
    token_hit = last.argmax(-1) == input_ids[rows, lengths - 1]
    word_hit = np.array([np.array_equal(logits[r, lengths[r] - 1 - k:lengths[r] - 1].argmax(-1),
                                        input_ids[r, lengths[r] - k:lengths[r]])
                         for r, k in zip(rows, word_lengths)])
    return last, token_hit, word_hit


def evaluate(fn, batches, desc="evaluating"):
    """(last-token logits [n, vocab], last-token hits [n], last-word hits [n]) in passage order."""
    parts = [score_batch(fn, b) for b in tqdm(batches, desc=desc, unit="batch")]
    return tuple(np.concatenate(p) for p in zip(*parts))


def _call(fn, batch):
    fn(input_ids=tf.constant(batch[0]), attention_mask=tf.constant(batch[1]))["logits"].numpy()


def time_models(fns, batches, warmup, iterations, progress=True, call=_call):
    """Seconds per call of each function, interleaved call by call over `batches` (cycled),
    so that a noisy machine slows every model alike. `call(fn, batch)` runs one (default: a
    signature function on a batch's input_ids and attention_mask)."""
    for i in range(warmup):
        for fn in fns:
            call(fn, batches[i % len(batches)])
    seconds = [[] for _ in fns]
    for i in tqdm(range(iterations), desc="timing", unit="it", disable=not progress):
        for fn, out in zip(fns, seconds):
            start = time.perf_counter()
            call(fn, batches[i % len(batches)])
            out.append(time.perf_counter() - start)
    return [np.array(s) for s in seconds]


def faster_or_slower(speedup):
    """A speed ratio (FP32 time / INT8 time) in words: '1.32x faster', or '1.14x slower' under 1."""
    return f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"


def logit_cosine_rows(a, b):
    """Cosine of each row of logits with its pair."""
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def argmax_agreement_rows(a, b):
    """Whether each row's argmax equals its pair's."""
    return a.reshape(-1, a.shape[-1]).argmax(-1) == b.reshape(-1, b.shape[-1]).argmax(-1)


def logit_cosine(a, b):
    return float(np.mean(logit_cosine_rows(a, b)))


def argmax_agreement(a, b):
    return float(np.mean(argmax_agreement_rows(a, b)))


def wilson_interval(hits, n, z=1.959964):
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return [0.0, 0.0]
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(centre - half), float(centre + half)]


def kl_divergence_rows(logits_p, logits_q):
    """KL(p || q) in nats of the softmax distributions, row by row."""
    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(logits_p), log_softmax(logits_q)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def mean_kl_divergence(logits_p, logits_q):
    """Mean KL(p || q) in nats of the softmax distributions, row by row."""
    return float(np.mean(kl_divergence_rows(logits_p, logits_q)))


def paired_logit_figures(logits_a, logits_b, rows=256):
    """{agreement, logit_cosine, kl_divergence} of two models' last-token logits [n, vocab], read
    `rows` at a time (they may be memory-mapped records larger than memory allows at float64);
    the same figures as argmax_agreement, logit_cosine and mean_kl_divergence on the whole."""
    parts = [(argmax_agreement_rows(a, b), logit_cosine_rows(a, b), kl_divergence_rows(a, b))
             for a, b in ((np.asarray(logits_a[i:i + rows]), np.asarray(logits_b[i:i + rows]))
                          for i in range(0, len(logits_a), rows))]
    agree, cosine, kl = (np.concatenate(p) for p in zip(*parts))
    return {"agreement": float(np.mean(agree)), "logit_cosine": float(np.mean(cosine)),
            "kl_divergence": float(np.mean(kl))}


def mcnemar_pvalue(hits_a, hits_b):
    """Exact two-sided McNemar test of paired hits: the p-value that both models are equally
    accurate, from the passages where exactly one of them is right."""
    from scipy.stats import binomtest
    only_a = int(np.sum(hits_a & ~hits_b))
    only_b = int(np.sum(~hits_a & hits_b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def compare_generation(steps, prompts, max_new_tokens, warmup=1):
    """generate_greedily's figures for models loaded together, the first of `steps` the reference."""
    return generate_greedily(steps, prompts, max_new_tokens, warmup)[0]


def generate_greedily(steps, prompts, max_new_tokens, warmup=1, reference=None):
    """Greedy generation of `max_new_tokens` from each prompt (batch 1) by each model in `steps`
    ([(prefill, decode)]), model by model in turn for every prompt, so that a noisy machine slows
    each alike. EOS does not stop it: every run makes the same number of tokens.

    The reference is the first model of `steps`, or, when the models run one at a time, `reference`:
    its greedy tokens [prompts, max_new_tokens] from an earlier call, against which every model of
    `steps` is compared. Returns (figures, tokens): per model {first_token_ms (median), next_token_ms
    (median), tokens_per_s} and, for each model compared with the reference,
    `teacher_forced_agreement`, the share of its greedy tokens equal to the reference's when both
    continue the reference's text, and `common_prefix`, the mean number of leading tokens its own
    free-running continuation shares with the reference's; and per model its greedy tokens."""
    from . import generation

    def run(prefill, decode, ids, forced=None):
        times, tokens = [], []
        start = time.perf_counter()
        for token, _ in generation.stream(prefill, decode, ids, np.ones_like(ids), max_new_tokens, forced=forced):
            times.append(time.perf_counter() - start)
            tokens.append(token[0])
            start = time.perf_counter()
        return np.array(times), np.array(tokens)

    for ids in prompts[:warmup]:
        for prefill, decode in steps:
            run(prefill, decode, np.array([ids], np.int32))
    times, tokens, agree, prefix = ([[] for _ in steps] for _ in range(4))
    for p, ids in enumerate(tqdm(prompts, desc="generating", unit="prompt")):
        ids = np.array([ids], np.int32)
        outs = [run(prefill, decode, ids) for prefill, decode in steps]
        ref = outs[0][1] if reference is None else reference[p]
        for m, (prefill, decode) in enumerate(steps):
            times[m].append(outs[m][0])
            tokens[m].append(outs[m][1])
            if m or reference is not None:
                _, forced = run(prefill, decode, ids, forced=ref[None, :])
                agree[m].append(forced == ref)
                same = outs[m][1] == ref
                prefix[m].append(len(same) if same.all() else int(np.argmin(same)))
    results = []
    for m in range(len(steps)):
        t = np.stack(times[m])
        r = {"first_token_ms": float(np.median(t[:, 0]) * 1000),
             "next_token_ms": float(np.median(t[:, 1:]) * 1000) if t.shape[1] > 1 else None,
             "tokens_per_s": float(t.size / t.sum())}
        if agree[m]:
            r["teacher_forced_agreement"] = float(np.mean(np.concatenate(agree[m])))
            r["common_prefix"] = float(np.mean(prefix[m]))
        results.append(r)
    return results, [np.stack(t) for t in tokens]
