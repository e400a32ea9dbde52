"""The pipeline as a user runs it: pairs in the graph, a SavedModel that plain TF loads and that
agrees with FP32, the dumps, the benchmark's JSON."""
import json
import re

import numpy as np
import pytest
import tensorflow as tf

from conftest import run_script, saved_model_cli_run
from gptj_int8 import benchmark, data, models, savedmodel
from gptj_int8.graph import GraphIndex
from gptj_int8.int8_matmul import DEFAULT_FORM, KERNEL_OPS, MATMUL, kernel_output


def _graph(path):
    g = tf.compat.v1.GraphDef()
    g.ParseFromString(path.read_bytes())
    return g


def _passage_batches(model_dir, n=24):
    tok = models.load_tokenizer(model_dir)
    seqs = data.encode_passages(tok, data.load_passages(data.EVALUATION_SET, n), 256)
    return data.batches(seqs, 1, tok.pad_token_id)


def _logits_of_both(fp32_dir, int8_dir, n=24):
    """serving_default's logits of the FP32 and the INT8 model on `n` passages, every position."""
    found = []
    for model in (fp32_dir, int8_dir):
        fn = tf.saved_model.load(str(model)).signatures["serving_default"]
        found.append(np.concatenate([fn(input_ids=tf.constant(ids), attention_mask=tf.constant(mask))["logits"].numpy()[0]
                                     for ids, mask, _ in _passage_batches(fp32_dir, n)]))
    return found


def test_extracted_graph_keeps_weights_as_variables(converted):
    _, _, out_dir = converted
    g = _graph(out_dir / "extracted_graph_def.pb")
    ops = [n.op for n in g.node]
    assert ops.count("MatMul") == 2 * 6 + 1          # q, k, v, out, fc_in, fc_out per layer + lm_head
    assert ops.count("ReadVariableOp") > 0
    assert not set(KERNEL_OPS.values()) & set(ops) and "QuantizeV2" not in ops
    # no weight tensor inside the protobuf: every Const is small
    assert max(n.attr["value"].tensor.ByteSize() for n in g.node if n.op == "Const") < 64 * 1024


def _kernel_input(index, kernel):
    """The node that makes an int8 kernel's activation (the convolution's goes through a Reshape)."""
    node = index.producer(kernel.input[0])
    return index.producer(node.input[0]) if node.op == "Reshape" else node


def _check_kernel_contract(index, n):
    """u8 activations x s8 weights, each output column with its own weight scale: inside the
    inner product (min_b/max_b vectors, no Mul after it), or after the convolution's int32 result
    (one Mul by a scale per column)."""
    const = lambda tensor: tf.make_ndarray(index.producer(tensor).attr["value"].tensor)
    width = const(n.input[2]).shape[0]      # the int32 bias, one per column
    quantize = index.producer(n.input[0])
    while quantize.op != "QuantizeV2":      # the convolution reads it through a Reshape
        quantize = index.producer(quantize.input[0])
    # narrow_range keeps TensorFlow's oneDNN layout pass from making it a slow _MklQuantizeV2
    assert quantize.attr["mode"].s == b"MIN_FIRST" and quantize.attr["narrow_range"].b
    if n.op == KERNEL_OPS[MATMUL]:
        assert n.attr["T1"].type == tf.quint8.as_datatype_enum and n.attr["T2"].type == tf.qint8.as_datatype_enum
        assert list(n.attr["fused_ops"].list.s) == [b"BiasAdd", b"Dequantize"]
        assert const(n.input[6]).shape == (width,)
        assert all(c.op != "Mul" for c in index.consumers[n.name])
    else:
        assert n.attr["Tinput"].type == tf.quint8.as_datatype_enum
        assert n.attr["Tfilter"].type == tf.qint8.as_datatype_enum
        assert n.attr["out_type"].type == tf.qint32.as_datatype_enum
        assert list(n.attr["fused_ops"].list.s) == [b"BiasAdd"] and n.attr["is_filter_const"].b
        node, chain = n, []
        while node.op != "Mul":
            node = index.consumers[node.name][0]
            chain.append(node.op)
        assert chain == ["Bitcast", "Reshape", "Cast", "Mul"]
        assert const(node.input[1]).shape == (width,)


def test_converted_graph_has_pairs_or_int8_kernels_before_every_dense_matmul(converted):
    name, _, out_dir = converted
    g = _graph(out_dir / "converted_graph_def.pb")
    index = GraphIndex(g)
    if "itex" in name:
        matmuls = [n for n in g.node if n.op == "MatMul"]
        assert len(matmuls) == 13
        for n in matmuls:
            act, weight = index.producer(n.input[0]), index.producer(n.input[1])
            assert act.op == "Dequantize" and index.producer(act.input[0]).op == "QuantizeV2"
            assert weight.op == "Dequantize"   # int8 weight variable, dequantized in the graph
    else:
        # --force_int8 takes the convolution form everywhere
        fused = [n for n in g.node if n.op in KERNEL_OPS.values()]
        assert {n.op for n in fused} == {KERNEL_OPS[DEFAULT_FORM]}
        # q, k, v and fc_in read one layer norm: one kernel, split back into their four outputs
        assert len(fused) == 2 * 3 + 1 and not any(n.op == "MatMul" for n in g.node)
        splits = [n for n in g.node if n.op == "SplitV"]
        assert [n.attr["num_split"].i for n in splits] == [4, 4]
        for n in fused:
            assert _kernel_input(index, n).op == "QuantizeV2"
            _check_kernel_contract(index, n)
        outputs = {kernel_output(n) for n in fused}
        for n in splits:   # each split reads a kernel's float output: the kernel, or its column scale
            assert n.input[0] in outputs
    float_concats = [n for n in g.node if n.op == "ConcatV2" and n.attr["T"].type == tf.float32.as_datatype_enum]
    assert len(float_concats) == 2 * 2                # the two rotary concats per layer
    for n in float_concats:
        # pairs for ITEX to fuse; stock TensorFlow has no int8 ConcatV2, so the fused form leaves them
        producers = [index.producer(t).op for t in n.input[:n.attr["N"].i]]
        if "itex" in name:
            assert producers == ["Dequantize"] * len(producers)
        else:
            assert "Dequantize" not in producers
    bmm = [n for n in g.node if n.op == "BatchMatMulV2"]
    assert all(index.producer(i).op == "Dequantize" for n in bmm for i in n.input) == ("perf" in name)


def test_default_conversion_keeps_fp32_only_where_int8_was_timed_slower(converted_timed, tiny_fp32):
    """Without --force_int8, each MatMul of each signature is an int8 kernel or is named in the log
    as kept in FP32 beside its measured times, or its whole step was timed faster in FP32 (or all in
    int8), as the log says; the model still agrees with FP32."""
    _, model, out_dir = converted_timed
    log = (out_dir / "quantize.log").read_text()
    assert "timed " in log and " ms, int8 matmul " in log and " ms, int8 conv " in log
    kept_lines = [line for line in log.splitlines() if "FP32 kept for" in line]
    for step, dump in (("serving_default", "converted_graph_def.pb"), ("decode", "converted_decode_graph_def.pb")):
        g = _graph(out_dir / dump)
        index = GraphIndex(g)
        matmuls = [n.name for n in g.node if n.op == "MatMul"]
        kernels = [n for n in g.node if n.op in KERNEL_OPS.values()]
        whole_step = re.search(rf"INFO convert {step}, whole step: .* ms -> (.*)", log).group(1)
        lines = [line for line in kept_lines if f"INFO convert {step}:" in line]
        kept = sum(int(re.search(r"FP32 kept for (\d+) MatMuls", line).group(1)) for line in lines)
        assert len(matmuls) == {"FP32": 2 * 6 + 1, "all int8": 0, "as chosen": kept}[whole_step]
        for line in lines:   # layer names as transformers' GPT-J names them
            shown = line.split("): ", 1)[1].split(" and ")[0].split(", ")
            assert all(re.fullmatch(r"transformer/h_\._\d+/(attn|mlp)/\w+|lm_head", name) for name in shown), shown
        assert len(kernels) + len(matmuls) >= 2 * 3 + 1
        # the log names the form of each kernel (last: after the whole step), and the graph has those kernels
        counts = re.findall(rf"INFO convert {step}: \d+ MatMuls -> (\d+) int8 kernels \((.*)\)", log)[-1]
        assert int(counts[0]) == len(kernels)
        logged = {f: int(n) for n, f in re.findall(r"(\d+) (matmul|conv)", counts[1])}
        assert logged == {f: c for f in KERNEL_OPS if (c := sum(n.op == KERNEL_OPS[f] for n in kernels))}
        for n in kernels:
            _check_kernel_contract(index, n)
    a, b = _logits_of_both(tiny_fp32, model, 8)
    assert benchmark.logit_cosine(a, b) >= 0.99


def test_converted_model_loads_with_plain_tf_and_agrees_with_fp32(converted, tiny_fp32):
    _, model, _ = converted
    int8 = tf.saved_model.load(str(model)).signatures["serving_default"]
    assert list(int8.structured_outputs) == ["logits"]
    a, b = _logits_of_both(tiny_fp32, model)
    assert benchmark.logit_cosine(a, b) >= 0.99


def test_converted_weights_are_int8_and_model_is_smaller(converted, tiny_fp32):
    _, model, _ = converted
    reader = tf.train.load_checkpoint(str(model / "variables" / "variables"))
    dtypes = reader.get_variable_to_dtype_map()
    shapes = reader.get_variable_to_shape_map()
    big = [k for k, s in shapes.items() if len(s) == 2]
    assert big and all(dtypes[k] == tf.int8 for k in big)     # every matrix, embedding included
    # weights on disk: int8 plus the small FP32 vectors (norms, biases, scales)
    assert savedmodel.saved_model_size(model / "variables") < 0.3 * savedmodel.saved_model_size(tiny_fp32 / "variables")
    for f in ("tokenizer.json", "config.json"):
        assert (model / f).exists()


def test_graph_dumps_and_pbtxt(converted, tmp_path):
    _, model, out_dir = converted
    proc = run_script("dump_graph_from_saved_model.py", f"--input_model={model}", cwd=tmp_path)
    assert (tmp_path / "dumped_graph.pb").exists() and "QuantizeV2" in proc.stdout
    assert len(_graph(tmp_path / "dumped_graph.pb").node) > 100
    run_script("pb_to_pbtxt.py", "--input", out_dir / "converted_graph_def.pb", "--output",
               tmp_path / "g.pbtxt", cwd=tmp_path)
    from google.protobuf import text_format
    g = text_format.Parse((tmp_path / "g.pbtxt").read_text(), tf.compat.v1.GraphDef())
    assert len(g.node) == len(_graph(out_dir / "converted_graph_def.pb").node)


def test_saved_model_cli_returns_logits(converted):
    _, model, _ = converted
    assert "logits" in saved_model_cli_run(model, "serving_default", "input_ids=[[1,2,3]];attention_mask=[[1,1,1]]")


def test_run_benchmark_prints_both_blocks_and_writes_json(benchmarked):
    """run_benchmark.py on the --force_int8 conversion (one flag set is enough for the script), with
    conftest's BENCHMARK_ARGS: 20 passages in batches of 2, generation of 3 prompts x 4 tokens."""
    proc, out_dir = benchmarked
    assert proc.stdout.count("with TF2.x API") == 2
    for line in ("Batch size = 2", "Accuracy: ", "Latency: ", "Throughput: "):
        assert line in proc.stdout
    results = json.loads((out_dir / "results.json").read_text())
    for key in ("original", "converted"):
        r = results[key]
        assert set(r) >= {"accuracy", "accuracy_ci95", "last_word_accuracy", "last_word_accuracy_ci95",
                          "latency_ms", "throughput", "num_samples"}
        assert r["num_samples"] == 20
        assert r["accuracy_ci95"][0] <= r["accuracy"] <= r["accuracy_ci95"][1]
        assert r["last_word_accuracy"] <= r["accuracy"]   # a whole-word hit includes its last token
    for key in ("original", "converted"):
        r = results[key]
        assert 0 < r["first_token_ms"] and 0 < r["next_token_ms"] and r["tokens_per_s"] > 0
    assert 0.0 <= results["teacher_forced_agreement"] <= 1.0 and 0 <= results["common_prefix"] <= 4
    assert "generation, 3 prompts x 4 greedy tokens" in proc.stdout
    assert 0.0 <= results["agreement"] <= 1.0
    assert results["kl_divergence"] >= 0.0 and 0.0 <= results["accuracy_diff_pvalue"] <= 1.0
    assert (out_dir / "results.png").stat().st_size > 0


def _bundled_batches(model, n=300):
    tok = models.load_tokenizer(model)
    return data.batches(data.encode_passages(tok, data.load_passages(data.EVALUATION_SET, n), 256), 8, tok.pad_token_id)


@pytest.fixture(scope="module")
def bundled_fp32_scores(bundled_fp32):
    """(last-token logits, last-token hits) of the FP32 bundled model on 300 passages, scored once
    for both conversions."""
    _, fp32 = savedmodel.load_serving_function(bundled_fp32)
    logits, token_hits, _ = benchmark.evaluate(fp32, _bundled_batches(bundled_fp32))
    return logits, token_hits


@pytest.mark.parametrize("flags", ["timed", "itex"])   # the main command's conversion, and the QDQ form
def test_bundled_model_int8_keeps_accuracy_and_agrees_with_fp32(bundled_fp32, bundled_int8, bundled_fp32_scores,
                                                                 flags):
    logits_a, token_a = bundled_fp32_scores
    _, int8 = savedmodel.load_serving_function(bundled_int8(flags))
    logits_b, token_b, _ = benchmark.evaluate(int8, _bundled_batches(bundled_fp32))
    assert token_a.mean() >= 0.30                       # a trained model: the drop is measurable
    assert benchmark.argmax_agreement(logits_a, logits_b) >= 0.95
    assert benchmark.logit_cosine(logits_a, logits_b) >= 0.99
    assert abs(token_a.mean() - token_b.mean()) <= 0.02   # 6 of 300 passages
