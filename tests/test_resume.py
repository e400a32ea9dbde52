"""run_benchmark.py records each scored passage: an interrupted run resumes where it stopped, a torn
record is cut, a changed flag or --fresh scores afresh. When memory holds only one model it runs them
one at a time, and when it cannot hold one it refuses before loading. Every way gives the accuracy
and agreement figures of the session's uninterrupted, interleaved run (`benchmarked`)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import BENCHMARK_ARGS, REPO, run_script
from gptj_int8 import data, evaluation, memory, models
from test_errors import _fails_cleanly

PASSAGES = int(BENCHMARK_ARGS[BENCHMARK_ARGS.index("--num_samples") + 1])
BATCH = int(BENCHMARK_ARGS[BENCHMARK_ARGS.index("--batch_size") + 1])
PAIR_FIGURES = ("agreement", "logit_cosine", "kl_divergence", "accuracy_diff_pvalue",
                "teacher_forced_agreement", "common_prefix")
MODEL_FIGURES = ("accuracy", "accuracy_ci95", "last_word_accuracy", "last_word_accuracy_ci95", "num_samples")


def _benchmark(out_dir, tiny_fp32, converted_fused, *extra, cwd, check=True):
    return run_script("run_benchmark.py", "--input_model", tiny_fp32, "--converted_model", converted_fused[1],
                      "--output_dir", out_dir, *BENCHMARK_ARGS, *extra, cwd=cwd, check=check)


def _results(out_dir):
    return json.loads((out_dir / "results.json").read_text())


def _assert_same_figures(out_dir, reference_dir):
    a, b = _results(reference_dir), _results(out_dir)
    for key in PAIR_FIGURES:
        assert a[key] == b[key], key
    for name in evaluation.MODELS:
        for key in MODEL_FIGURES:
            assert a[name][key] == b[name][key], (name, key)


def _copy_scores(benchmarked, out_dir):
    shutil.copytree(benchmarked[1] / "scores", out_dir / "scores")
    return out_dir / "scores"


def _record_size(tiny_fp32):
    return evaluation.record_dtype(evaluation.vocab_size(tiny_fp32)).itemsize


def _needs(tiny_fp32, converted_fused):
    """(bytes both models need together, bytes the larger needs alone) for BENCHMARK_ARGS' run, as
    run_benchmark.py plans it."""
    tok = models.load_tokenizer(tiny_fp32)
    sequences = data.encode_passages(tok, data.load_passages(data.EVALUATION_SET, PASSAGES),
                                     models.context_length(tiny_fp32))
    phases = evaluation.run_phases(data.batches(sequences, BATCH, tok.pad_token_id),
                                   evaluation.vocab_size(tiny_fp32), generating=True)
    together, alone = memory.needs({"FP32": tiny_fp32, "INT8": converted_fused[1]}, phases)
    return together, max(alone.values())


def test_interrupted_scoring_resumes_with_the_same_figures(tmp_path, tiny_fp32, converted_fused, benchmarked):
    """`kill` once FP32 has scored a batch, then the same command: it keeps what was scored, scores
    the rest, and gives the uninterrupted run's figures."""
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        pytest.skip("SIGTERM is ignored by the process running the tests, and by its children")
    out = tmp_path / "out"
    args = ["--input_model", tiny_fp32, "--converted_model", converted_fused[1], "--output_dir", out, *BENCHMARK_ARGS]
    proc = subprocess.Popen([sys.executable, str(REPO / "run_benchmark.py"), *map(str, args)], cwd=tmp_path,
                            env=dict(os.environ, PYTHONPATH=str(REPO)), stderr=subprocess.PIPE, bufsize=0)
    seen = b""
    # the progress bar's lines end in "\r", not "\n": read bytes as they come
    while not re.search(rb"FP32 scoring: [1-9]\d*/", seen):
        chunk = proc.stderr.read(4096)
        assert chunk, seen.decode()[-3000:]
        seen += chunk
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert proc.returncode == 130 and "error: interrupted" in rest, rest[-3000:]
    scored = {name: (out / "scores" / f"{name}.bin").stat().st_size // _record_size(tiny_fp32)
              for name in evaluation.MODELS}
    assert scored["original"] >= BATCH and scored["converted"] < PASSAGES, scored     # part-way

    again = _benchmark(out, tiny_fp32, converted_fused, cwd=tmp_path)
    for name, label in evaluation.MODELS.items():
        n = scored[name]
        if n == PASSAGES:
            assert f"{label}: all {PASSAGES} passages scored already" in again.stderr
            assert f"{label} scoring:" not in again.stderr
        else:
            # its progress starts at what was recorded: those passages are not scored again
            assert f"{label} scoring: {n}/{PASSAGES} passages" in again.stderr
            assert (f"{label}: resuming at passage {n + 1} of {PASSAGES}" in again.stderr) == (n > 0)
    _assert_same_figures(out, benchmarked[1])


def test_torn_record_is_cut_and_the_rest_scored(tmp_path, tiny_fp32, converted_fused, benchmarked):
    """What a SIGKILL in the middle of an append leaves: half a record after whole ones. It is cut,
    with the whole records after the last whole batch, and scoring goes on from there."""
    scores = _copy_scores(benchmarked, tmp_path)
    size = _record_size(tiny_fp32)
    os.truncate(scores / "converted.bin", 5 * size + size // 2)
    proc = _benchmark(tmp_path, tiny_fp32, converted_fused, cwd=tmp_path)
    cut = 5 * size + size // 2 - 4 * size                 # batches of 2: the fifth record goes too
    assert f"INT8: cut {cut} bytes after the last whole batch" in proc.stderr
    assert f"INT8: resuming at passage 5 of {PASSAGES}" in proc.stderr
    assert f"FP32: all {PASSAGES} passages scored already" in proc.stderr
    assert (scores / "converted.bin").stat().st_size == PASSAGES * size
    _assert_same_figures(tmp_path, benchmarked[1])


def test_changed_flag_or_fresh_scores_afresh(tmp_path, tiny_fp32, converted_fused, benchmarked):
    _copy_scores(benchmarked, tmp_path)
    fewer = ["--num_samples", "10", "--gen_samples", "0"]
    proc = _benchmark(tmp_path, tiny_fp32, converted_fused, *fewer, cwd=tmp_path)
    for label in evaluation.MODELS.values():
        assert f"{label}: scoring afresh: num_samples changed ({PASSAGES} -> 10)" in proc.stderr
    assert _results(tmp_path)["original"]["num_samples"] == 10
    first = _results(tmp_path)

    proc = _benchmark(tmp_path, tiny_fp32, converted_fused, *fewer, "--fresh", cwd=tmp_path)
    for label in evaluation.MODELS.values():
        assert f"{label}: scoring afresh: --fresh" in proc.stderr and f"{label} scoring: 0/10" in proc.stderr

    proc = _benchmark(tmp_path, tiny_fp32, converted_fused, *fewer, "--iterations", "2", cwd=tmp_path)
    for label in evaluation.MODELS.values():       # --iterations is no scoring flag: the records serve
        assert f"{label}: all 10 passages scored already" in proc.stderr and f"{label} scoring:" not in proc.stderr
    again = _results(tmp_path)
    assert all(again[k] == first[k] for k in ("agreement", "logit_cosine", "kl_divergence"))


def test_one_at_a_time_when_both_models_do_not_fit(tmp_path, tiny_fp32, converted_fused, benchmarked):
    """--max_memory_gb between the larger model's need and both models' needs: each model is scored,
    timed and made to generate alone, with the interleaved run's accuracy figures."""
    together, alone = _needs(tiny_fp32, converted_fused)
    assert _results(benchmarked[1])["timing"] == memory.INTERLEAVED
    limit = (together + alone) / 2 / 1e9
    proc = _benchmark(tmp_path, tiny_fp32, converted_fused, "--max_memory_gb", repr(limit), cwd=tmp_path)
    assert _results(tmp_path)["timing"] == memory.ONE_AT_A_TIME
    assert f"timing: one at a time, FP32 then INT8 (together they would need {memory.gb(together)} GB" in proc.stdout
    assert proc.stdout.count("with TF2.x API") == 2
    _assert_same_figures(tmp_path, benchmarked[1])


def test_refused_before_loading_when_one_model_alone_does_not_fit(tmp_path, tiny_fp32, converted_fused):
    _, alone = _needs(tiny_fp32, converted_fused)
    limit = round(alone / 2e9, 2)
    proc = _benchmark(tmp_path / "out", tiny_fp32, converted_fused, "--max_memory_gb", limit, cwd=tmp_path,
                      check=False)
    assert proc.returncode == 2
    _fails_cleanly(proc, f"model needs {memory.gb(alone)} GB and {memory.gb(limit * 1e9)} GB is available "
                         f"(--max_memory_gb {limit:g}): it cannot be loaded even on its own")
    assert "scoring" not in proc.stderr and not (tmp_path / "out").exists()
