"""run_benchmark.py records each scored batch: a changed flag or --fresh scores afresh (interrupted runs
that resume: test_scoring.py). When memory holds only one model it runs them
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
    assert set(a) == set(b)
    for key in set(PAIR_FIGURES) & set(a):           # without generation, no teacher-forced figures
        assert a[key] == b[key], key
    for name in evaluation.MODELS:
        for key in MODEL_FIGURES:
            assert a[name][key] == b[name][key], (name, key)


def _copy_scores(benchmarked, out_dir):
    shutil.copytree(benchmarked[1] / "scores", out_dir / "scores")
    return out_dir / "scores"


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
