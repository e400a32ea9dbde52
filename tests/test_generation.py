"""Generation: the KV cache against recomputation, left padding, one int8 copy of each weight for
every signature, sampling (in `generate` and in the host loop, one sampler), generate.py as a user
runs it, and models exported before generation or sampling existed."""
import functools
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_script, saved_model_cli_run
from gptj_int8 import data, generation, models
from gptj_int8.int8_matmul import KERNEL_OPS

PROMPTS = ["And God said", "In the beginning God created the heaven and the earth. And the earth was"]


@functools.cache
def _signatures(path):
    """(loaded model, its signatures), loaded once per module: a load and the first call of each
    signature take seconds, and the models are small."""
    loaded = tf.saved_model.load(str(path))
    return loaded, {k: loaded.signatures[k] for k in ("serving_default", "prefill", "decode", "generate")}


def _recompute(serving, ids, n):
    """Greedy continuation by re-running serving_default on the whole growing sequence."""
    seq = list(ids)
    for _ in range(n):
        logits = serving(input_ids=tf.constant([seq]), attention_mask=tf.ones([1, len(seq)], tf.int32))["logits"]
        seq.append(int(logits.numpy()[0, -1].argmax()))
    return seq[len(ids):]


def _generate(fn, prompts, n, pad_id, sampling=generation.GREEDY):
    """The new tokens [batch, n] of a `generate` call on left-padded token id lists."""
    input_ids, attention_mask = generation.left_pad(prompts, pad_id)
    out = fn(**generation.generate_inputs(fn, input_ids, attention_mask, n, sampling))["sequences"].numpy()
    assert out.shape == (len(prompts), input_ids.shape[1] + n)
    np.testing.assert_array_equal(out[:, :input_ids.shape[1]], input_ids)
    return out[:, input_ids.shape[1]:]


def test_cached_steps_give_the_logits_of_recomputation(tiny_fp32):
    _, sig = _signatures(tiny_fp32)
    tok = models.load_tokenizer(tiny_fp32)
    ids = tok(PROMPTS[1])["input_ids"]
    forced = np.array([[5, 17, 99, 1000, 7]], np.int32)
    steps = generation.stream(sig["prefill"], sig["decode"], np.array([ids], np.int32),
                              np.ones((1, len(ids)), np.int32), forced.shape[1], forced=forced)
    for i, (_, logits) in enumerate(steps):
        seq = ids + forced[0, :i].tolist()
        full = sig["serving_default"](input_ids=tf.constant([seq]),
                                      attention_mask=tf.ones([1, len(seq)], tf.int32))["logits"].numpy()[0, -1]
        np.testing.assert_allclose(logits[0], full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_decode_writes_the_cache_in_place_and_grows_it_in_chunks(which, tiny_fp32, converted_fused):
    """A decode step writes its position into the cache it is given (the caller's buffer changes) and
    returns a cache of the same capacity, until the positions outgrow it: then one of the next
    multiple of kv_cache.CHUNK. Across that boundary every step still gives the logits of
    serving_default on the whole sequence (the same int8 kernels and ranges in INT8)."""
    from gptj_int8 import kv_cache
    model = tiny_fp32 if which == "fp32" else converted_fused[1]
    _, sig = _signatures(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4096, (2, kv_cache.CHUNK + 6)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :3] = 0                                        # a left-padded row
    full = sig["serving_default"](input_ids=tf.constant(ids), attention_mask=tf.constant(mask))["logits"].numpy()
    start = kv_cache.CHUNK - 4
    out = sig["prefill"](input_ids=tf.constant(ids[:, :start]), attention_mask=tf.constant(mask[:, :start]))
    cache = out["past_key_values"]
    assert cache.shape[4] == kv_cache.CHUNK
    for t in range(start, ids.shape[1]):
        before = cache.numpy()
        out = sig["decode"](input_ids=tf.constant(ids[:, t:t + 1]), attention_mask=tf.constant(mask[:, :t + 1]),
                            past_key_values=cache)
        after_call = cache.numpy()
        if t < kv_cache.CHUNK:
            assert out["past_key_values"].shape[4] == kv_cache.CHUNK
            assert not np.array_equal(before[..., t, :], after_call[..., t, :])    # written where it was
            np.testing.assert_array_equal(before[..., :t, :], after_call[..., :t, :])
        else:
            assert out["past_key_values"].shape[4] == 2 * kv_cache.CHUNK
        cache = out["past_key_values"]
        np.testing.assert_allclose(out["logits"].numpy(), full[:, t], rtol=1e-4, atol=1e-4)


def test_fp32_generate_equals_greedy_recomputation_on_the_bundled_model(bundled_fp32):
    model = bundled_fp32
    _, sig = _signatures(model)
    tok = models.load_tokenizer(model)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert _generate(sig["generate"], [ids], 16, tok.pad_token_id)[0].tolist() == _recompute(
            sig["serving_default"], ids, 16)


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_left_padded_batch_gives_each_prompt_its_own_tokens(which, tiny_fp32, converted_fused):
    _, int8_model, _ = converted_fused
    model = tiny_fp32 if which == "fp32" else int8_model
    _, sig = _signatures(model)
    tok = models.load_tokenizer(model)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    batch = _generate(sig["generate"], prompts, 12, tok.pad_token_id)
    for row, prompt in zip(batch, prompts):
        np.testing.assert_array_equal(row, _generate(sig["generate"], [prompt], 12, tok.pad_token_id)[0])


def test_every_signature_is_converted_and_shares_one_int8_copy_of_each_weight(converted, tiny_fp32):
    name, model, out_dir = converted
    reader = tf.train.load_checkpoint(str(model / "variables" / "variables"))
    int8 = [k for k, d in reader.get_variable_to_dtype_map().items() if d == tf.int8]
    # per layer: q, k, v and fc_in side by side (fused) or apart (itex), out_proj, fc_out; lm_head; embedding
    per_layer = 3 if "itex" not in name else 6
    assert len(int8) == 2 * per_layer + 1 + 1
    assert (sum(f.stat().st_size for f in (model / "variables").iterdir())
            <= 0.3 * sum(f.stat().st_size for f in (tiny_fp32 / "variables").iterdir()))
    for step in ("prefill", "decode"):
        graph = tf.compat.v1.GraphDef()
        graph.ParseFromString((out_dir / f"converted_{step}_graph_def.pb").read_bytes())
        ops = [n.op for n in graph.node]
        if "itex" in name:
            assert ops.count("Dequantize") >= 2 * 6 + 1 and not set(KERNEL_OPS.values()) & set(ops)
        else:
            assert sum(ops.count(op) for op in KERNEL_OPS.values()) == 2 * 3 + 1 and "MatMul" not in ops
    _, sig = _signatures(model)
    assert set(sig["generate"].structured_outputs) == {"sequences", "lengths"}
    assert set(sig["generate"].structured_input_signature[1]) == {
        "input_ids", "attention_mask", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}


def test_int8_generation_agrees_with_fp32_on_the_bundled_model(bundled_fp32, bundled_int8):
    """Teacher-forced: INT8 (the main command's conversion) continues FP32's greedy text and picks FP32's
    token. The 30 prompts run as one left-padded batch (run_benchmark.py's routine runs them one by one)."""
    fp32_dir, int8_dir = bundled_fp32, bundled_int8("timed")
    tok = models.load_tokenizer(fp32_dir)
    encoded = data.encode_passages(tok, data.load_passages(data.EVALUATION_SET, 30), 256)
    input_ids, attention_mask = generation.left_pad([ids[:-n][-200:] for ids, n in encoded], tok.pad_token_id)
    (fp32_steps, int8_steps) = [(s["prefill"], s["decode"]) for s in (_signatures(fp32_dir)[1], _signatures(int8_dir)[1])]
    fp32 = np.stack([t for t, _ in generation.stream(*fp32_steps, input_ids, attention_mask, 24)], axis=1)
    int8 = np.stack([t for t, _ in generation.stream(*int8_steps, input_ids, attention_mask, 24, forced=fp32)], axis=1)
    assert (int8 == fp32).mean() >= 0.95, (int8 == fp32).mean()


def test_generate_py_streams_a_continuation(converted_fused, tmp_path):
    _, model, _ = converted_fused
    proc = run_script("generate.py", "--model", model, "--prompt", "And God said", "--max_new_tokens", "8",
                      cwd=tmp_path)
    assert proc.stdout.startswith("And God said") and len(proc.stdout.strip()) > len("And God said")
    assert "first token" in proc.stderr and "ms/token" in proc.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    proc = run_script("generate.py", "--model", model, "--prompt_file", prompts, "--max_new_tokens", "6",
                      "--do_sample", "--temperature", "0.8", "--top_k", "40", "--top_p", "0.9", "--seed", "3",
                      cwd=tmp_path)
    assert all(p in proc.stdout for p in PROMPTS) and "batch 2" in proc.stderr
    again = run_script("generate.py", "--model", model, "--prompt_file", prompts, "--max_new_tokens", "6",
                       "--do_sample", "--temperature", "0.8", "--top_k", "40", "--top_p", "0.9", "--seed", "3",
                       cwd=tmp_path)
    assert again.stdout == proc.stdout            # a seed gives the same samples


def test_saved_model_cli_runs_generate(converted_fused):
    _, model, _ = converted_fused
    out = saved_model_cli_run(model, "generate", "input_ids=[[1,2,3]];attention_mask=[[1,1,1]];max_new_tokens=5;"
                                                 "temperature=0.8;top_k=40;top_p=0.9;seed=1")
    assert "sequences" in out and "lengths" in out


##### Sampling #####


def test_sampler_keeps_only_the_allowed_tokens():
    """next_tokens on known probabilities, 400 rows of one call: top_k and top_p draw only their
    tokens (top_p keeps a token while the likelier ones have less than p), a low temperature the
    likeliest."""
    logits = tf.math.log(tf.tile([[0.5, 0.3, 0.15, 0.05]], [400, 1]))

    def drawn(temperature=1.0, top_k=0, top_p=1.0):
        settings = generation.sampling_inputs(generation.Sampling(temperature, top_k, top_p, seed=0))
        return set(generation.next_tokens(logits, **settings, step=tf.constant(0)).numpy().tolist())
    assert drawn() == {0, 1, 2, 3}
    assert drawn(top_k=2) == {0, 1}
    assert drawn(top_p=0.6) == {0, 1}          # 0.5 alone is below 0.6: 0 and 1 stay
    assert drawn(top_p=0.5) == {0}
    assert drawn(top_k=3, top_p=0.95) == {0, 1, 2}   # within the top 3, 0.8 / 0.95 is below 0.95
    assert drawn(temperature=0.05) == {0}
    assert drawn(temperature=0.0) == {0}


def _nucleus_by_full_sort(logits, top_p, tolerance=1e-5):
    """The tokens top_p keeps, by the definition, in float64: sorted descending, a token stays while
    the ones before it have less than p, and tokens tied with the last one kept stay too. As (the
    tokens kept, those that float32's running sums may keep or not: before within tolerance of p)."""
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-logits, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]

    def kept(p):
        return set(np.flatnonzero(logits >= logits[order][max((before < p).sum(), 1) - 1]).tolist())
    surely = kept(top_p - tolerance)
    return surely, kept(top_p + tolerance) - surely


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_without_a_full_sort_keeps_what_a_full_sort_keeps(top_p):
    """allowed_logits' top_p, which sorts only the tokens where the nucleus ends, keeps the tokens a
    full sort keeps: GPT-J's vocabulary with flat (random-model) and peaked (trained-model) logits and
    a row with a token far below the rest, in one batch; then rows whose logits are all equal or
    heavily tied (with a -inf), which take the full sort. Up to float32's rounding of the running
    sums, which decides between tokens a thousandth of a percent of mass apart."""
    rng = np.random.default_rng(0)
    vocab = 50400
    flat = rng.normal(0, 1, vocab)
    peaked = rng.normal(0, 3, vocab) + np.where(rng.random(vocab) < 0.001, 12.0, 0.0)
    far = rng.normal(0, 1, vocab)
    far[3] = -200.0
    ties = np.round(rng.normal(0, 1, vocab), 1)
    ties[7] = -np.inf
    p = tf.constant(top_p, tf.float32)
    for rows, by_intervals in [([flat, peaked, far], True), ([np.zeros(vocab), ties], False)]:
        rows = tf.constant(np.stack(rows), tf.float32)
        log_total = tf.reduce_logsumexp(rows, axis=-1, keepdims=True)
        assert bool(generation.nucleus_end_by_intervals(rows, log_total, p)[1]) == by_intervals
        kept = generation.allowed_logits(rows, tf.constant(0), p).numpy()
        for row, out in zip(rows.numpy(), kept):
            surely, maybe = _nucleus_by_full_sort(row.astype(np.float64), top_p)
            assert surely <= set(np.flatnonzero(np.isfinite(out)).tolist()) <= surely | maybe
            assert len(maybe) < 100
            assert np.array_equal(out[np.isfinite(out)], row[np.isfinite(out)])


def test_generate_counts_each_rows_tokens_up_to_its_eos():
    """`lengths` over a scripted decode whose rows give EOS at the steps asked: rows go on with EOS
    after theirs; when every row has, the loop stops and the rest is EOS."""
    eos, width = 7, 2
    eos_at = tf.Variable([0, 0, 0])

    @tf.function(input_signature=generation.input_specs(generation.DECODE, generation.cache_spec(1, 1, 1)))
    def decode(input_ids, attention_mask, past_key_values):
        token = tf.where(tf.equal(eos_at, tf.shape(attention_mask)[1] - width), eos, 5)
        return {"logits": tf.one_hot(token, 8) * 10.0, generation.CACHE: past_key_values}
    generate = generation.generate_signature(decode, eos, 64)

    def run(steps):
        eos_at.assign(steps)
        ids = np.ones((3, width), np.int32)
        out = generate(**generation.generate_inputs(generate, ids, np.ones_like(ids), 6))
        return out["sequences"].numpy()[:, width:].tolist(), out["lengths"].numpy().tolist()
    assert run([1, 3, 99]) == ([[5, 7, 7, 7, 7, 7], [5, 5, 5, 7, 7, 7], [5] * 6], [2, 4, 6])
    assert run([0, 1, 0]) == ([[7] * 6, [5, 7, 7, 7, 7, 7], [7] * 6], [1, 2, 1])


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_sampling_in_generate_and_in_the_host_loop(which, tiny_fp32, converted_fused):
    """Temperature 0, and top_k 1, give the greedy tokens (each the argmax of the host loop's logits);
    a seed gives the same samples twice and other seeds others; equal prompts in one batch draw
    apart; generate.py's host loop gives the signature's tokens for the same settings and seed; bad
    settings fail the request with the setting's rule, and the next request runs."""
    model = tiny_fp32 if which == "fp32" else converted_fused[1]
    _, sig = _signatures(model)
    tok = models.load_tokenizer(model)
    prompts = [tok(p)["input_ids"] for p in (PROMPTS[0], PROMPTS[0], PROMPTS[0], PROMPTS[1])]
    input_ids, attention_mask = generation.left_pad(prompts, tok.pad_token_id)
    steps = list(generation.stream(sig["prefill"], sig["decode"], input_ids, attention_mask, 8))
    greedy = np.stack([t for t, _ in steps], axis=1)
    np.testing.assert_array_equal(greedy, np.stack([logits.argmax(-1) for _, logits in steps], axis=1))

    def run(*settings):
        return _generate(sig["generate"], prompts, 8, tok.pad_token_id, generation.Sampling(*settings))
    np.testing.assert_array_equal(run(0.0, 0, 1.0, 5), greedy)
    np.testing.assert_array_equal(run(1.0, 1, 1.0, 5), greedy)
    sampling = generation.Sampling(0.9, 50, 0.95, 1)
    sampled = run(*sampling)
    np.testing.assert_array_equal(run(*sampling), sampled)
    assert all((run(*sampling._replace(seed=seed)) != sampled).any() for seed in (2, 3))
    assert len({tuple(row) for row in sampled[:3]}) == 3
    host = generation.stream(sig["prefill"], sig["decode"], input_ids, attention_mask, 8, sampling)
    np.testing.assert_array_equal(np.stack([t for t, _ in host], axis=1), sampled)

    for name, value, rule in [("temperature", -1.0, ">= 0"), ("top_k", -1, ">= 0"), ("top_p", 1.5, "(0, 1]")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=rf"{name} must be .*{re.escape(rule)}"):
            run(*sampling._replace(**{name: value}))
    np.testing.assert_array_equal(run(*sampling), sampled)


def _chi_square_p_value(tokens, probs):
    """Pearson's chi-square p-value of `tokens` drawn from `probs`: a bin of its own for each token
    expected at least 5 times, one for the rest (when it is expected at all)."""
    from scipy.stats import chisquare
    expected, observed = probs * len(tokens), np.bincount(tokens, minlength=len(probs))
    alone = expected >= 5
    bins = [(observed[alone], expected[alone])]
    if expected[~alone].sum() > 1e-9:
        bins.append(([observed[~alone].sum()], [expected[~alone].sum()]))
    observed, expected = (np.concatenate(b) for b in zip(*bins))
    return chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


def test_first_sampled_tokens_follow_the_softmax(bundled_fp32):
    """1000 rows of one prompt in one `generate` call draw 1000 first tokens apart. Pearson's
    chi-square test at significance 0.001 (fixed seeds: the outcome is the same on every run) does
    not reject the softmax of the prompt's logits at temperature 1, nor the softmax over the top_k 2
    or top_p 0.5 tokens; and those never draw another token."""
    _, sig = _signatures(bundled_fp32)
    tok = models.load_tokenizer(bundled_fp32)
    prompt = tok("And the")["input_ids"]
    logits = sig["prefill"](input_ids=tf.constant([prompt]), attention_mask=tf.ones([1, len(prompt)], tf.int32))
    logits = logits["logits"].numpy()[0].astype(np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    before = np.cumsum(probs[order]) - probs[order]
    nucleus = order[before < 0.5]
    # the cuts fall between clearly different probabilities: float rounding cannot move them
    assert probs[order[1]] > 1.2 * probs[order[2]] and abs(before[len(nucleus)] - 0.5) > 1e-3
    for settings, allowed in [((1.0, 0, 1.0, 11), order), ((1.0, 2, 1.0, 12), order[:2]), ((1.0, 0, 0.5, 13), nucleus)]:
        tokens = _generate(sig["generate"], [prompt] * 1000, 1, tok.pad_token_id, generation.Sampling(*settings))[:, 0]
        assert set(tokens.tolist()) <= set(allowed.tolist()), settings
        within = np.zeros_like(probs)
        within[allowed] = probs[allowed] / probs[allowed].sum()
        assert _chi_square_p_value(tokens, within) > 0.001, settings


@pytest.fixture(scope="module")
def serving_only(tmp_path_factory, tiny_fp32):
    """tiny_fp32 as exported before the generation signatures existed: serving_default only."""
    path = tmp_path_factory.mktemp("old") / "serving-only"
    loaded = tf.saved_model.load(str(tiny_fp32))
    tf.saved_model.save(loaded, str(path), signatures={"serving_default": loaded.signatures["serving_default"]})
    for f in tiny_fp32.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy2(f, path / f.name)
    return path


def test_a_model_without_generation_signatures_converts_and_benchmarks(serving_only, tmp_path):
    int8 = tmp_path / "int8"
    run_script("quantize.py", "--input_model", serving_only, "--converted_model", int8,
               "--output_dir", tmp_path / "out", "--calib_samples", "4", "--force_int8", cwd=tmp_path)
    assert list(tf.saved_model.load(str(int8)).signatures) == ["serving_default"]
    proc = run_script("run_benchmark.py", "--input_model", serving_only, "--converted_model", int8,
                      "--output_dir", tmp_path / "out", "--num_samples", "4", "--iterations", "2",
                      "--warmup", "1", cwd=tmp_path)
    assert proc.stdout.count("with TF2.x API") == 2 and "no generation signatures" in proc.stderr
    proc = run_script("generate.py", "--model", int8, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "re-export it with prepare_model.py" in proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def greedy_only(tmp_path_factory, tiny_fp32):
    """tiny_fp32 as exported before sampling existed: its `generate` takes input_ids, attention_mask
    and max_new_tokens alone, and returns sequences alone."""
    path = tmp_path_factory.mktemp("old") / "greedy-only"
    loaded = tf.saved_model.load(str(tiny_fp32))
    sampling, greedy = loaded.signatures["generate"], generation.sampling_inputs(generation.GREEDY)

    @tf.function(input_signature=[generation.token_spec("input_ids"), generation.token_spec("attention_mask"),
                                  tf.TensorSpec([], tf.int32, name="max_new_tokens")])
    def generate(input_ids, attention_mask, max_new_tokens):
        out = sampling(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, **greedy)
        return {"sequences": out["sequences"]}
    signatures = {name: loaded.signatures[name] for name in ("serving_default", "prefill", "decode")}
    tf.saved_model.save(loaded, str(path), signatures={**signatures, "generate": generate})
    for f in tiny_fp32.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy2(f, path / f.name)
    return path


def test_a_model_from_before_sampling_samples_with_generate_py(greedy_only, tmp_path):
    """generate.py samples through prefill and decode, whatever `generate` takes: a model whose
    `generate` is greedy only samples with generate.py as the host loop does. Its `generate` still
    runs greedy (generation.generate_inputs), and refuses sampling settings in words."""
    proc = run_script("generate.py", "--model", greedy_only, "--prompt", PROMPTS[0], "--max_new_tokens", "6",
                      "--do_sample", "--top_k", "40", "--seed", "4", cwd=tmp_path)
    _, sig = _signatures(greedy_only)
    tok = models.load_tokenizer(greedy_only)
    prompt = np.array([tok(PROMPTS[0])["input_ids"]], np.int32)
    sampled = [int(t[0]) for t, _ in generation.stream(sig["prefill"], sig["decode"], prompt, np.ones_like(prompt), 6,
                                                       generation.Sampling(1.0, 40, 1.0, 4))]
    assert proc.stdout == PROMPTS[0] + tok.decode(sampled) + "\n"
    greedy = [int(t[0]) for t, _ in generation.stream(sig["prefill"], sig["decode"], prompt, np.ones_like(prompt), 6)]
    assert _generate(sig["generate"], prompt.tolist(), 6, tok.pad_token_id)[0].tolist() == greedy
    with pytest.raises(ValueError, match="greedy only"):
        _generate(sig["generate"], prompt.tolist(), 6, tok.pad_token_id, generation.Sampling(1.0, 0, 1.0, 1))


@pytest.mark.parametrize("args, words", [
    (["--prompt", " "], "prompt is empty"),
    (["--max_new_tokens", "0"], "positive integer"),
    (["--max_new_tokens", "256"], "does not fit the context"),
    (["--do_sample", "--temperature", "-0.5"], "--temperature must be a number >= 0 (0: greedy), got -0.5"),
    (["--do_sample", "--top_p", "0"], "--top_p must be a number in (0, 1] (1: no limit), got 0.0"),
    (["--do_sample", "--top_p", "1.5"], "--top_p must be a number in (0, 1]"),
    (["--do_sample", "--top_k", "-1"], "--top_k must be an integer >= 0 (0: no limit), got -1"),
    (["--prompt_file", "missing.txt"], "prompt file not found"),
])
def test_generate_py_bad_input(converted_fused, tmp_path, args, words):
    _, model, _ = converted_fused
    proc = run_script("generate.py", "--model", model, *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "error:" in last and words in last, last


def test_generate_py_keeps_the_tail_of_a_long_prompt(converted_fused, tmp_path):
    _, model, _ = converted_fused
    proc = run_script("generate.py", "--model", model, "--prompt", "and the LORD said " * 100,
                      "--max_new_tokens", "4", cwd=tmp_path)
    assert "keep their last 252 tokens" in proc.stderr
