"""Generation: the KV cache against recomputation, left padding, one int8 copy of each weight for
every signature, generate.py as a user runs it, and models exported before generation existed."""
import shutil

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_script, saved_model_cli_run
from gptj_int8 import data, generation, models
from gptj_int8.int8_matmul import KERNEL_OPS

PROMPTS = ["And God said", "In the beginning God created the heaven and the earth. And the earth was"]


def _signatures(path):
    loaded = tf.saved_model.load(str(path))
    return loaded, {k: loaded.signatures[k] for k in ("serving_default", "prefill", "decode", "generate")}


def _recompute(serving, ids, n):
    """Greedy continuation by re-running serving_default on the whole growing sequence."""
    seq = list(ids)
    for _ in range(n):
        logits = serving(input_ids=tf.constant([seq]), attention_mask=tf.ones([1, len(seq)], tf.int32))["logits"]
        seq.append(int(logits.numpy()[0, -1].argmax()))
    return seq[len(ids):]


def _generate(fn, prompts, n, pad_id):
    input_ids, attention_mask = generation.left_pad(prompts, pad_id)
    out = fn(input_ids=tf.constant(input_ids), attention_mask=tf.constant(attention_mask),
             max_new_tokens=tf.constant(n))["sequences"].numpy()
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
    assert set(sig["generate"].structured_outputs) == {"sequences"}


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
    out = saved_model_cli_run(model, "generate", "input_ids=[[1,2,3]];attention_mask=[[1,1,1]];max_new_tokens=5")
    assert "sequences" in out


def test_sampler_keeps_only_the_top_tokens():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    top_k = generation.sampler(top_k=2, seed=0)
    assert {int(top_k(logits)[0]) for _ in range(200)} == {0, 1}
    top_p = generation.sampler(top_p=0.6, seed=0)     # 0.5 alone is below 0.6: 0 and 1 stay
    assert {int(top_p(logits)[0]) for _ in range(200)} == {0, 1}
    sharp = generation.sampler(temperature=0.05, seed=0)
    assert {int(sharp(logits)[0]) for _ in range(50)} == {0}


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


@pytest.mark.parametrize("args, words", [
    (["--prompt", " "], "prompt is empty"),
    (["--max_new_tokens", "0"], "positive integer"),
    (["--max_new_tokens", "256"], "does not fit the context"),
    (["--do_sample", "--temperature", "0"], "--temperature must be positive"),
    (["--do_sample", "--top_p", "0"], "(0, 1]"),
    (["--do_sample", "--top_k", "0"], "positive integer"),
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
