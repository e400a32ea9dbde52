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


def test_zero_calibration_samples(tmp_path, tiny_fp32):
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--calib_samples", "0", cwd=tmp_path, check=False)
    _fails_cleanly(proc, "positive integer")


def test_keep_fp32_name_that_is_no_layer(tmp_path, tiny_fp32):
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--converted_model", tmp_path / "int8",
                      "--calib_samples", "1", "--keep_fp32", "out_proj, attn_out", cwd=tmp_path, check=False)
    _fails_cleanly(proc, "'attn_out' names no MatMul", "transformer/h_._0/attn/k_proj")


def test_unreadable_pb(tmp_path):
    bad = tmp_path / "broken.pb"
    bad.write_bytes(b"\x0a\xff\xff\xff garbage")
    proc = run_script("pb_to_pbtxt.py", "--input", bad, cwd=tmp_path, check=False)
    _fails_cleanly(proc, "not a GraphDef")
    graph = tf.function(lambda x: tf.nn.relu(x) * 2.0 + 1.0).get_concrete_function(
        tf.TensorSpec([None, 8], tf.float32)).graph.as_graph_def()
    whole = graph.SerializeToString()
    bad.write_bytes(whole[:len(whole) // 2])            # truncated mid-message
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


@pytest.fixture(scope="module")
def wrong_signature_model(tmp_path_factory):
    """A SavedModel whose serving_default takes `tokens` and returns `scores`."""
    path = tmp_path_factory.mktemp("wrongsig") / "model"
    module = tf.Module()

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="tokens")], autograph=False)
    def serve(tokens):
        return {"scores": tf.cast(tokens, tf.float32)}

    module.serve = serve
    tf.saved_model.save(module, str(path), signatures={"serving_default": serve})
    return path


def test_signature_without_the_expected_inputs(tmp_path, wrong_signature_model):
    proc = run_script("dump_graph_from_saved_model.py", "--input_model", wrong_signature_model,
                      cwd=tmp_path, check=False)
    _fails_cleanly(proc, "input_ids")


def test_file_where_a_folder_is_expected(tmp_path):
    f = tmp_path / "model.pb"
    f.write_bytes(b"x")
    proc = run_script("dump_graph_from_saved_model.py", "--input_model", f, cwd=tmp_path, check=False)
    _fails_cleanly(proc, "got a file")


def test_folder_where_a_file_is_expected(tmp_path, tiny_fp32):
    proc = run_script("pb_to_pbtxt.py", "--input", tmp_path, cwd=tmp_path, check=False)
    _fails_cleanly(proc, "got a folder")
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--dataset", tmp_path, cwd=tmp_path, check=False)
    _fails_cleanly(proc, "got a folder")


@pytest.mark.parametrize("content, words", [
    (None, "not found"), ("", "empty"), ("this is not json\n", "not JSON lines"),
    (json.dumps({"sentence": "a b c"}) + "\n", "'text'"),
    ("\n".join(json.dumps({"text": t}) for t in ["", "one", "   "]) + "\n", "no usable passages"),
])
def test_bad_dataset_files(tmp_path, tiny_fp32, content, words):
    path = tmp_path / "set.jsonl"
    if content is not None:
        path.write_text(content)
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--dataset", path, cwd=tmp_path, check=False)
    _fails_cleanly(proc, words)


@pytest.mark.parametrize("flag, value", [("--num_samples", "0"), ("--batch_size", "-2"),
                                          ("--iterations", "ten"), ("--warmup", "-1"), ("--max_memory_gb", "0")])
def test_bad_numbers(tmp_path, flag, value):
    proc = run_script("run_benchmark.py", flag, value, cwd=tmp_path, check=False)
    _fails_cleanly(proc, flag)


def test_generate_py_refuses_a_model_it_cannot_hold(tmp_path, converted_fused):
    from gptj_int8 import generation, memory
    model = converted_fused[1]
    need = memory.serving_need(model, generation.STEPS)
    limit = round(need / 2e9, 2)
    proc = run_script("generate.py", "--model", model, "--max_memory_gb", limit, cwd=tmp_path, check=False)
    _fails_cleanly(proc, f"the INT8 model {model} needs {memory.gb(need)} GB and {memory.gb(limit * 1e9)} GB "
                         f"is available (--max_memory_gb {limit:g}): generate.py cannot load it")
    assert proc.stdout == ""


def test_passages_longer_than_the_context_are_cut_and_counted(tmp_path, tiny_fp32):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"text": " ".join(["word"] * 400) + " end"}) + "\n"
                    + json.dumps({"text": "a short passage that ends"}) + "\n")
    proc = run_script("quantize.py", "--input_model", tiny_fp32, "--dataset", long, "--converted_model",
                      tmp_path / "int8", "--output_dir", tmp_path / "out", "--force_int8", cwd=tmp_path)
    assert "1 of 2 passages were longer than 256 tokens" in proc.stderr


def test_not_enough_disk_space(tmp_path, monkeypatch):
    import shutil
    from gptj_int8 import cli, savedmodel
    graph = savedmodel.ServingGraph(tf.compat.v1.GraphDef(), {}, {"logits": "x:0"}, {"w": tf.Variable(tf.zeros([1000]))})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    with pytest.raises(cli.UserError, match="not enough disk space"):
        savedmodel.save_serving_graph(graph, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_killed_conversion_leaves_nothing_behind_after_the_next_run(tmp_path, tiny_fp32):
    target = tmp_path / "converted"
    stale = tmp_path / ".converted.tmp-999999999"     # what a SIGKILLed writer leaves
    stale.mkdir()
    (stale / "variables").mkdir()
    run_script("quantize.py", "--input_model", tiny_fp32, "--converted_model", target,
               "--output_dir", tmp_path / "out", "--calib_samples", "2", "--force_int8", cwd=tmp_path)
    assert (target / "saved_model.pb").exists() and not stale.exists()
