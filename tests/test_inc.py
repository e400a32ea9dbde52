"""quantize.py --engine inc: Intel Neural Compressor's quantize_model behind our command line. The
bundled trained model through it gives a SavedModel with `logits` that plain TensorFlow runs and that
agrees with FP32 whatever the CPU (its layer norms keep their epsilon, its zero points are whole);
INC's files stay under --output_dir; a model INC cannot fit is refused before any work."""
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
def inc_converted(tmp_path_factory, bundled_fp32):
    """(converted SavedModel, output_dir, working folder) of quantize.py --engine inc on the bundled
    model: trained, its layer norms have the non-zero betas that TensorFlow's oneDNN remapper needs to
    fuse them (the tiny random model's are zero, and grappler folds them away)."""
    cwd = tmp_path_factory.mktemp("inc")
    model, out_dir = cwd / "converted-inc", cwd / "output-inc"
    run_script("quantize.py", "--engine", "inc", "--input_model", bundled_fp32, "--converted_model", model,
               "--output_dir", out_dir, "--calib_samples", "16", "--keep_fp32", "lm_head", cwd=cwd, fresh_process=True)
    return model, out_dir, cwd


def _graph(path):
    g = tf.compat.v1.GraphDef()
    g.ParseFromString(path.read_bytes())
    return g


def _config(model):
    return json.loads((model / "config.json").read_text())


def test_inc_model_has_logits_and_agrees_with_fp32(inc_converted, bundled_fp32):
    model, _, _ = inc_converted
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ    # stock TensorFlow's default on this CPU
    fp32 = tf.saved_model.load(str(bundled_fp32)).signatures["serving_default"]
    int8 = tf.saved_model.load(str(model)).signatures["serving_default"]
    assert list(int8.structured_outputs) == ["logits"]
    tok = models.load_tokenizer(bundled_fp32)
    seqs = data.encode_passages(tok, data.load_passages(data.EVALUATION_SET, 16), 256)
    a, b = [], []
    for input_ids, attention_mask, _ in data.batches(seqs, 1, tok.pad_token_id):
        feed = dict(input_ids=tf.constant(input_ids), attention_mask=tf.constant(attention_mask))
        a.append(fp32(**feed)["logits"].numpy()[0])
        b.append(int8(**feed)["logits"].numpy()[0])
    a, b = np.concatenate(a), np.concatenate(b)
    # every position of 16 passages (1061), on a 2-core AMD EPYC Zen 4 (AVX-512 VNNI): 0.989 and
    # 0.99995; 0.857 and 0.996 with the layer norms' epsilon lost to TensorFlow's oneDNN remapper,
    # as on any CPU with AVX-512 VNNI, BF16 or AMX before inc.with_layer_norm_epsilon
    assert benchmark.argmax_agreement(a, b) >= 0.95
    assert benchmark.logit_cosine(a, b) >= 0.9995
    for f in ("tokenizer.json", "config.json"):
        assert (model / f).exists()


def test_inc_graph_dumps_hold_int8_kernels_and_work_files_stay_in_output_dir(inc_converted, bundled_fp32):
    _, out_dir, cwd = inc_converted
    before = [n.op for n in _graph(out_dir / "extracted_graph_def.pb").node]
    after = [n.op for n in _graph(out_dir / "converted_graph_def.pb").node]
    matmuls = _config(bundled_fp32)["n_layer"] * 6 + 1      # q, k, v, out, fc_in, fc_out per layer + lm_head
    assert before.count("MatMul") == matmuls
    # --keep_fp32 lm_head: INC's op-wise configuration keeps that one FP32
    assert after.count("_QuantizedMatMul") == matmuls - 1 and after.count("MatMul") == 1
    assert inc.INC_INT8_MATMUL not in after                   # its kernel needs the oneDNN layout pass
    assert (out_dir / "inc_workspace").is_dir()
    assert not (cwd / "nc_workspace").exists()
    log = (out_dir / "quantize.log").read_text()
    assert f"INC: {matmuls} MatMuls -> {matmuls - 1} int8 kernels, 1 left in FP32" in log
    assert "INC: FP32 kept for 1 MatMuls, as --keep_fp32='lm_head' asks" in log


def test_inc_layer_norms_keep_the_models_epsilon_on_every_cpu(inc_converted, bundled_fp32):
    """TensorFlow's oneDNN remapper (on by default on CPUs with AVX-512 VNNI, BF16 or AMX) fuses a
    layer norm of constant weights, as INC freezes them, into _MklLayerNorm with epsilon 0.001, not
    GPT-J's 1e-5: when INC loads the model there, and when the saved graph is loaded on any such CPU.
    So each one is fused already, with the model's epsilon, in both dumps, whichever CPU converted."""
    _, out_dir, _ = inc_converted
    config = _config(bundled_fp32)
    for dump in ("extracted_graph_def.pb", "converted_graph_def.pb"):
        graph = _graph(out_dir / dump)
        norms = [n for n in graph.node if n.name.endswith("batchnorm/add_1")]   # ln_1 of each layer, ln_f
        assert len(norms) == config["n_layer"] + 1
        assert all(n.op == "_MklLayerNorm" for n in norms), [n.op for n in norms]
        assert {n.attr["epsilon"].f for n in norms} == {np.float32(config["layer_norm_epsilon"])}
        assert not any(n.op == "Rsqrt" for n in graph.node)


def test_written_out_layer_norm_is_fused_with_its_own_epsilon():
    """The form INC's frozen graph has where TensorFlow's oneDNN rewrites are off (AVX2 CPUs): a layer
    norm written out as tf-keras writes it at GPT-J's epsilon becomes one _MklLayerNorm of that
    epsilon, which computes the layer norm here, rewrites on or off. Left written out, this graph
    computes, with the rewrites on, a layer norm of epsilon 0.001: 1.47 off at most here (activations
    of variance 4e-4, where the epsilon matters)."""
    rng = np.random.default_rng(0)
    table, gamma, beta = rng.normal(0, 0.02, (50, 64)), rng.normal(1, 0.1, 64), rng.normal(0, 0.1, 64)
    with tf.Graph().as_default() as g:
        ids, _ = (tf.compat.v1.placeholder(tf.int32, [None, None], name=k) for k in ("input_ids", "attention_mask"))
        x = tf.gather(tf.constant(table, tf.float32), ids)
        mean = tf.reduce_mean(x, [2], keepdims=True)
        variance = tf.reduce_mean(tf.math.squared_difference(x, mean), [2], keepdims=True)
        tf.identity(tf.nn.batch_normalization(x, mean, variance, tf.constant(beta, tf.float32),
                                              tf.constant(gamma, tf.float32), 1e-5), name=inc.INC_OUTPUT)
    fused, changed = inc.with_layer_norm_epsilon(g.as_graph_def(), epsilon=None)
    norms = [n for n in fused.node if n.op == "_MklLayerNorm"]
    assert changed == 1 and len(norms) == 1 and norms[0].attr["epsilon"].f == np.float32(1e-5)
    assert not any(n.op == "Rsqrt" for n in fused.node)
    ids, mask = np.array([[3, 1, 4, 1, 5]], np.int32), np.ones((1, 5), np.int32)
    got, = tf.function(lambda i, m: tf.graph_util.import_graph_def(
        fused, input_map={"input_ids:0": i, "attention_mask:0": m}, return_elements=[f"{inc.INC_OUTPUT}:0"]))(ids, mask)
    x = table[ids]
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * gamma + beta
    np.testing.assert_allclose(got.numpy(), want, atol=1e-3)


def test_inc_zero_points_are_whole_and_compensated(inc_converted):
    """TensorFlow's own QuantizeV2 adds a rounded zero point, oneDNN's (TF_ENABLE_ONEDNN_OPTS on) an
    exact one; they agree when it is whole. The int32 bias of each kernel is then exactly the whole
    zero point's compensation (INC keeps GPT-J's own biases in a BiasAdd after the kernel)."""
    _, out_dir, _ = inc_converted
    graph = _graph(out_dir / "converted_graph_def.pb")
    nodes = {n.name: n for n in graph.node}

    def value(tensor):
        return tf.make_ndarray(nodes[tensor.split(":")[0]].attr["value"].tensor)

    kernels = [n for n in graph.node if n.op == "_QuantizedMatMul"]
    assert kernels
    for k in kernels:
        quantize = nodes[k.input[0].split(":")[0]]
        lo, hi = (float(value(quantize.input[i])) for i in (1, 2))
        zero = -lo * 255 / (hi - lo)
        assert zero == pytest.approx(round(zero), abs=1e-3), (quantize.name, zero)
        weight = value(k.input[1]).view(np.int8).astype(np.int64)
        column_sums = weight.sum(axis=1 if k.attr["transpose_b"].b else 0)
        assert np.abs(value(k.input[2]).view(np.int32) + round(zero) * column_sums).max() <= 1, k.name


def test_run_benchmark_reads_the_inc_model_unchanged(inc_converted, bundled_fp32, tmp_path):
    model, _, _ = inc_converted
    proc = run_script("run_benchmark.py", "--input_model", bundled_fp32, "--converted_model", model,
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
