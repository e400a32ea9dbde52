"""The benchmark's metrics on inputs whose answers are known."""
import numpy as np

from gptj_int8 import benchmark, data


def _fake_model(logits):
    import tensorflow as tf
    return lambda input_ids, attention_mask: {"logits": tf.constant(logits)}


def test_score_batch_last_token_and_last_word():
    vocab = 10
    # two passages, right-padded: [1 2 3 4] with a 2-token last word, [5 6 7] with a 1-token word
    input_ids, attention_mask = data.pad_batch([[1, 2, 3, 4], [5, 6, 7]], 0)
    logits = np.zeros((2, 4, vocab), np.float32)
    logits[0, 1, 9] = 1    # predicts 9 where 3 comes: first token of the word missed
    logits[0, 2, 4] = 1    # predicts 4: last token right
    logits[1, 1, 7] = 1    # predicts 7: right
    last, token_hit, word_hit = benchmark.score_batch(
        _fake_model(logits), (input_ids, attention_mask, np.array([2, 1])))
    np.testing.assert_array_equal(last.argmax(-1), [4, 7])
    np.testing.assert_array_equal(token_hit, [True, True])
    np.testing.assert_array_equal(word_hit, [False, True])


def test_wilson_interval_known_value():
    low, high = benchmark.wilson_interval(50, 100)
    assert abs(low - 0.4038) < 1e-3 and abs(high - 0.5962) < 1e-3


def test_kl_and_mcnemar():
    rng = np.random.RandomState(0)
    a = rng.randn(5, 20)
    assert abs(benchmark.mean_kl_divergence(a, a)) < 1e-12
    assert benchmark.mean_kl_divergence(a, a + rng.randn(5, 20)) > 0
    hits = np.array([True] * 30 + [False] * 70)
    assert benchmark.mcnemar_pvalue(hits, hits) == 1.0
    assert benchmark.mcnemar_pvalue(hits, np.zeros(100, bool)) < 1e-6   # 30 discordant, all one way


def test_encode_passages_splits_the_last_word():
    from gptj_int8 import models
    tok = models.load_tokenizer(models.BUNDLED_MODEL)
    (ids, n), = data.encode_passages(tok, ["and the LORD spake unto Moses"], 256)
    assert tok.decode(ids[-n:]) == " Moses"
    assert tok.decode(ids) == "and the LORD spake unto Moses"


class _FakeGraph:
    """Stands in for a ServingGraph whose quantized sites are `quantized`: it predicts the right
    last token unless the harmful site is quantized, and is slightly off for the mild one."""

    def __init__(self, quantized=()):
        self.quantized = {s.matmul for s in quantized}

    def serving_fn(self):
        import tensorflow as tf

        def fn(input_ids, attention_mask):
            ids = input_ids.numpy()
            logits = np.zeros(ids.shape + (8,), np.float32)
            for r, row in enumerate(ids):
                for t in range(len(row) - 1):
                    logits[r, t, row[t + 1]] = 5.0
                    if "harmful" in self.quantized and r % 2 == 0:
                        logits[r, t, (row[t + 1] + 1) % 8] = 9.0
                    if "mild" in self.quantized:
                        logits[r, t, 0] += 0.1
            return {"logits": tf.constant(logits)}
        return fn


def test_fallback_keeps_the_harmful_matmul_in_fp32():
    from gptj_int8 import fallback, sites
    found = [sites.MatMulSite(name, "x", "w") for name in ("mild", "harmful", "harmless")]
    batches = data.batches([([1, 2, 3, 4], 1), ([2, 3, 4, 5], 1), ([3, 4, 5, 6], 1), ([4, 5, 6, 7], 1)],
                           2, 0)
    kept = fallback.choose_fp32_sites(_FakeGraph(), found, lambda g, chosen: _FakeGraph(chosen),
                                      batches, max_drop=0.5)
    assert [s.matmul for s in kept] == ["harmful"]
    assert fallback.choose_fp32_sites(_FakeGraph(), found, lambda g, chosen: _FakeGraph(chosen),
                                      batches, max_drop=60.0) == []
