"""Bad input ends in one clear line on stderr and a non-zero exit, never a traceback; a failed run
leaves an existing converted model as it was."""
import json

import pytest
import tensorflow as tf

from conftest import run_script


def _fails_cleanly(proc, *words):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") or "error: argument" in last, proc.stderr[-2000:]
    for w in words:
        assert w in last, last
    return last


@pytest.fixture(scope="module")
def no_signature_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("nosig") / "model"
    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(path))
    return path


def test_missing_model_folder(tmp_path):
    proc = run_script("quantize.py", "--input_model", tmp_path / "nope", cwd=tmp_path, check=False)
    _fails_cleanly(proc, "not found")


def test_folder_that_is_not_a_saved_model(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_script("quantize.py", "--input_model", tmp_path / "empty", cwd=tmp_path, check=False)
    _fails_cleanly(proc, "not a SavedModel")


def test_saved_model_without_serving_default(tmp_path, no_signature_model, tiny_fp32):
    proc = run_script("run_benchmark.py", "--input_model", tiny_fp32, "--converted_model", no_signature_model,
                      "--output_dir", tmp_path, cwd=tmp_path, check=False)
    _fails_cleanly(proc, "serving_default")


def test_dataset_without_usable_passages(tmp_path, tiny_fp32):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps({"text": t}) for t in ["", "one", "   "]) + "\n")
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--dataset", bad, cwd=tmp_path, check=False)
    _fails_cleanly(proc, "no usable passages")


def test_dataset_without_text_field(tmp_path, tiny_fp32):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence": "a b c"}) + "\n")
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--dataset", bad, cwd=tmp_path, check=False)
    _fails_cleanly(proc, "'text'")


def test_zero_calibration_samples(tmp_path, tiny_fp32):
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--calib_samples", "0", cwd=tmp_path, check=False)
    _fails_cleanly(proc, "positive integer")


def test_unreadable_pb(tmp_path):
    bad = tmp_path / "broken.pb"
    bad.write_bytes(b"\x0a\xff\xff\xff garbage")
    proc = run_script("pb_to_pbtxt.py", "--input", bad, cwd=tmp_path, check=False)
    _fails_cleanly(proc, "not a GraphDef")


def test_unknown_config_override(tmp_path):
    proc = run_script("prepare_model.py", "--random_init", "--config_overrides", "n_layers=1",
                      "--output_dir", tmp_path / "m", cwd=tmp_path, check=False)
    _fails_cleanly(proc, "n_layers")


def test_existing_folder_that_is_not_a_model_is_not_replaced(tmp_path, tiny_fp32):
    target = tmp_path / "documents"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--converted_model", target,
                      "--output_dir", tmp_path / "out", cwd=tmp_path, check=False)
    _fails_cleanly(proc, "--overwrite")
    assert (target / "notes.txt").read_text() == "mine"


def test_output_inside_the_input_model_is_refused(tmp_path, tiny_fp32):
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--converted_model", tiny_fp32 / "int8",
                      "--output_dir", tmp_path / "out", cwd=tmp_path, check=False)
    _fails_cleanly(proc, "inside the input model")
    assert not (tiny_fp32 / "int8").exists()


def test_failed_run_leaves_existing_converted_model_untouched(tmp_path, tiny_fp32):
    target = tmp_path / "converted"
    target.mkdir()
    (target / "saved_model.pb").write_text("previous model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x"}) + "\n")
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--converted_model", target,
                      "--dataset", bad, "--output_dir", tmp_path / "out", cwd=tmp_path, check=False)
    _fails_cleanly(proc)
    assert (target / "saved_model.pb").read_text() == "previous model"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".converted")] == []
