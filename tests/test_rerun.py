"""Reruns give the same model; an interrupted conversion leaves the previous one intact."""
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import BENCHMARK_ARGS, CONVERSION_ARGS, CONVERSIONS, REPO, run_script
from gptj_int8 import data


def _variables(model):
    reader = tf.train.load_checkpoint(str(model / "variables" / "variables"))
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in k}


def test_same_inputs_give_the_same_model(tmp_path, workdir, tiny_fp32, converted_fused):
    """A second run of the session's --force_int8 conversion, with the same flags, gives its graph and
    weights byte for byte (--force_int8: which kernels pay is timed anew on each run, and near-ties may
    fall either way)."""
    _, first, first_out = converted_fused
    run_script("quantize.py", "--input_model", tiny_fp32, "--converted_model", tmp_path / "int8",
               "--output_dir", tmp_path / "out", *CONVERSION_ARGS, *CONVERSIONS["fused"], cwd=workdir)
    graphs = [(out / "converted_graph_def.pb").read_bytes() for out in (first_out, tmp_path / "out")]
    assert graphs[0] == graphs[1]
    va, vb = _variables(first), _variables(tmp_path / "int8")
    assert va.keys() == vb.keys()
    for k in va:
        np.testing.assert_array_equal(va[k], vb[k])


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "kill"])
def test_interrupted_conversion_keeps_the_previous_model(tmp_path, tiny_fp32, converted_fused, signum):
    if signal.getsignal(signum) == signal.SIG_IGN:
        # a shell without job control starts background jobs with SIGINT ignored; so would quantize.py be
        pytest.skip(f"{signum.name} is ignored by the process running the tests, and by its children")
    target = tmp_path / "converted"
    shutil.copytree(converted_fused[1], target)      # the previous run's model
    before = _variables(target)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, str(REPO / "quantize.py"), "--input_model", str(tiny_fp32),
                             "--converted_model", str(target), "--output_dir", str(tmp_path / "out"),
                             "--dataset", str(data.EVALUATION_SET), "--calib_samples", "1500"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:                     # wait until it is busy calibrating (seconds of it)
        if line.startswith("calibrating:"):
            break
    proc.send_signal(signum)
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130 and "error: interrupted" in rest, rest[-3000:]
    after = _variables(target)
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".converted")]


def test_benchmark_accuracy_is_the_same_on_reruns(tmp_path, workdir, tiny_fp32, converted_fused, benchmarked):
    """run_benchmark.py again, with the flags of the session's first run: the same scores."""
    run_script("run_benchmark.py", "--input_model", tiny_fp32, "--converted_model", converted_fused[1],
               "--output_dir", tmp_path, *BENCHMARK_ARGS, cwd=workdir)
    a, b = (json.loads((out / "results.json").read_text()) for out in (benchmarked[1], tmp_path))
    for key in ("agreement", "logit_cosine", "kl_divergence", "accuracy_diff_pvalue"):
        assert a[key] == b[key]
    for name in ("original", "converted"):
        for key in ("accuracy", "last_word_accuracy", "num_samples"):
            assert a[name][key] == b[name][key]
