"""quantize.py --engine inc: Intel Neural Compressor's quantize_model behind our command line. The
tiny model through it gives a SavedModel with `logits` that plain TensorFlow runs and that agrees
with FP32; INC's files stay under --output_dir; a model INC cannot fit is refused before any work."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_script
from gptj_int8 import benchmark, data, inc, models
from gptj_int8.cli import UserError
from test_errors import _fails_cleanly


@pytest.fixture(scope="module")
def inc_converted(tmp_path_factory, tiny_fp32):
    """(converted SavedModel, output_dir, working folder) of quantize.py --engine inc on the tiny model."""
    cwd = tmp_path_factory.mktemp("inc")
    model, out_dir = cwd / "converted-inc", cwd / "output-inc"
    run_script("quantize.py", "--engine", "inc", "--input_model", tiny_fp32, "--converted_model", model,
               "--output_dir", out_dir, "--calib_samples", "16", cwd=cwd, fresh_process=True)
    return model, out_dir, cwd


def _graph(path):
    g = tf.compat.v1.GraphDef()
    g.ParseFromString(path.read_bytes())
    return g


def test_inc_model_has_logits_and_agrees_with_fp32(inc_converted, tiny_fp32):
    model, _, _ = inc_converted
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ    # stock TensorFlow's default on this CPU
    fp32 = tf.saved_model.load(str(tiny_fp32)).signatures["serving_default"]
    int8 = tf.saved_model.load(str(model)).signatures["serving_default"]
    assert list(int8.structured_outputs) == ["logits"]
    tok = models.load_tokenizer(tiny_fp32)
    seqs = data.encode_passages(tok, data.load_passages(data.EVALUATION_SET, 16), 256)
    a, b = [], []
    for input_ids, attention_mask, _ in data.batches(seqs, 1, tok.pad_token_id):
        feed = dict(input_ids=tf.constant(input_ids), attention_mask=tf.constant(attention_mask))
        a.append(fp32(**feed)["logits"].numpy()[0])
        b.append(int8(**feed)["logits"].numpy()[0])
    a, b = np.concatenate(a), np.concatenate(b)
    # random weights give flat logits whose argmax flips on noise: the cosine is the measure here,
    # as in test_pipeline; agreement on the trained bundled model is bench/accuracy.py's job
    assert benchmark.logit_cosine(a, b) >= 0.99
    for f in ("tokenizer.json", "config.json"):
        assert (model / f).exists()


def test_inc_graph_dumps_hold_int8_kernels_and_work_files_stay_in_output_dir(inc_converted):
    _, out_dir, cwd = inc_converted
    before = [n.op for n in _graph(out_dir / "extracted_graph_def.pb").node]
    after = [n.op for n in _graph(out_dir / "converted_graph_def.pb").node]
    assert before.count("MatMul") == 2 * 6 + 1                 # q, k, v, out, fc_in, fc_out per layer + lm_head
    assert after.count("_QuantizedMatMul") == 2 * 6 + 1 and "MatMul" not in after
    assert inc.INC_INT8_MATMUL not in after                   # its kernel needs the oneDNN layout pass
    assert (out_dir / "inc_workspace").is_dir()
    assert not (cwd / "nc_workspace").exists()
    assert "INC: 13 MatMuls -> 13 int8 kernels" in (out_dir / "quantize.log").read_text()


def test_run_benchmark_reads_the_inc_model_unchanged(inc_converted, tiny_fp32, tmp_path):
    model, _, _ = inc_converted
    proc = run_script("run_benchmark.py", "--input_model", tiny_fp32, "--converted_model", model,
                      "--output_dir", tmp_path, "--num_samples", "8", "--batch_size", "2",
                      "--warmup", "1", "--iterations", "2", cwd=tmp_path)
    assert proc.stdout.count("with TF2.x API") == 2
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["converted"]["num_samples"] == 8 and 0.0 <= results["agreement"] <= 1.0
    assert results["logit_cosine"] >= 0.99


def test_memory_estimate_grows_with_the_model_and_is_refused_when_over_the_limit(tiny_fp32):
    small, large = inc.estimate_peak_rss(20e6), inc.estimate_peak_rss(600e6)
    assert small < large and large >= 20e9                     # a 608 MB GPT-J was killed at 24 GB here
    assert inc.available_memory(max_memory_gb=0.5) <= 0.5e9
    with pytest.raises(UserError, match="default engine"):
        inc.check_fits(tiny_fp32, max_memory_gb=0.5)
    inc.check_fits(tiny_fp32, max_memory_gb=1000)              # the OS's available memory caps it then


def test_model_over_protobufs_limit_is_refused(tmp_path):
    model = tmp_path / "big"
    (model / "variables").mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"")
    with open(model / "variables" / "variables.data-00000-of-00001", "wb") as f:
        f.truncate(2 ** 31 + 1)                               # sparse: 2 GB on paper, nothing on disk
    with pytest.raises(UserError, match="2 GB"):
        inc.check_fits(model)


def test_quantize_refuses_inc_when_memory_is_short(tmp_path, tiny_fp32):
    out = tmp_path / "converted"
    proc = run_script("quantize.py", "--engine", "inc", "--max_memory_gb", "0.5", "--input_model", tiny_fp32,
                      "--converted_model", out, "--output_dir", tmp_path / "output", cwd=tmp_path, check=False)
    last = _fails_cleanly(proc, "INC would need", "0.5 GB available", "default engine")
    assert "--engine inc" in last
    assert not out.exists() and not (tmp_path / "output").exists()


@pytest.mark.parametrize("flags, words", [
    (["--max_accuracy_drop", "0.5"], ["--max_accuracy_drop", "default engine"]),
    (["--performance_only"], ["--performance_only", "default engine"]),
    (["--per_channel"], ["--per_channel", "per tensor"]),
    (["--itex_mode"], ["--itex_mode", "Intel Extension for TensorFlow"]),
])
def test_quantize_refuses_flags_inc_cannot_honour(tmp_path, tiny_fp32, flags, words):
    if "--itex_mode" in flags and inc.itex_installed():
        pytest.skip("ITEX is installed: INC's ITEX backend is available")
    proc = run_script("quantize.py", "--engine", "inc", *flags, "--input_model", tiny_fp32,
                      "--converted_model", tmp_path / "c", "--output_dir", tmp_path / "o", cwd=tmp_path, check=False)
    _fails_cleanly(proc, *words)
