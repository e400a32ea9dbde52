"""The int8 kernels and weight storage, checked against float64 arithmetic, at small sizes; and a
model whose weights exceed protobuf's 2 GB, converted without them ever entering a GraphDef."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from gptj_int8 import calibration, int8_matmul, kernel_choice, qdq, savedmodel, sites, smoothquant, weights
from gptj_int8.graph import make_const, make_node, make_resource_placeholder


def _run(graph):
    dummy = tf.zeros([1, 1], tf.int32)
    return graph.function()(dummy, dummy)[0].numpy()


def _kernel_ops(graph):
    ops = [n.op for n in graph.graph_def.node]
    return {form: ops.count(op) for form, op in int8_matmul.KERNEL_OPS.items()}


@pytest.mark.parametrize("form", int8_matmul.FORMS)
@pytest.mark.parametrize("shift", [0.0, 1.5])   # centred activations, and mostly positive ones
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_fused_int8_matmul_matches_float64(shift, with_bias, per_channel, form):
    rng = np.random.RandomState(0)
    x = (rng.randn(64, 512) + shift).astype(np.float32)
    # truncated-normal weights fill the int8 range: the case where int16 pair sums saturate
    w = np.clip(rng.randn(512, 384) * 0.02, -0.04, 0.04).astype(np.float32)
    w *= np.linspace(0.1, 2.0, 384, dtype=np.float32)   # columns of different ranges
    bias = (rng.randn(384) * 0.1).astype(np.float32) if with_bias else None
    ref = x.astype(np.float64) @ w.astype(np.float64) + (0 if bias is None else bias)
    graph = savedmodel.matmul_graph(x, w, bias)
    found = sites.find_matmul_sites(graph)
    assert len(found) == 1 and (found[0].bias_add is not None) == with_bias
    ranges = {"x": (float(x.min()), float(x.max()))}
    fused = int8_matmul.fuse_int8_matmuls(graph, found, ranges, weights.Int8Weights(per_channel), form)
    assert _kernel_ops(fused) == {f: int(f == form) for f in int8_matmul.FORMS}
    out = _run(fused)
    rel = np.abs(out - ref).mean() / np.abs(ref).mean()
    assert rel < 0.03, rel


def test_a_weight_read_only_by_its_int8_kernel_is_freed_once_its_int8_copy_exists():
    """What lets a conversion hold each weight once: the FP32 variable is emptied when its int8 copy
    is made, the kernel still computes the product, and a later FP32 read fails loudly. A weight
    some node reads in FP32 (here: a MatMul that stays FP32) is not released."""
    rng = np.random.RandomState(1)
    x = rng.randn(8, 64).astype(np.float32)
    w = (rng.randn(64, 32) * 0.1).astype(np.float32)
    graph = savedmodel.matmul_graph(x, w, None)
    found = sites.find_matmul_sites(graph)
    variable = graph.feeds[found[0].weight]
    assert sites.int8_only_weights(graph, [], []) == (set(), {id(variable)})
    only, other = sites.int8_only_weights(graph, found, [])
    assert only == {id(variable)} and not other
    store = weights.Int8Weights(per_channel=True, release=only)
    fused = int8_matmul.fuse_int8_matmuls(graph, found, {"x": (float(x.min()), float(x.max()))}, store)
    assert variable.numpy().size == 0
    out = _run(savedmodel.prune(fused))
    assert np.abs(out - x @ w).mean() / np.abs(x @ w).mean() < 0.03
    with pytest.raises(RuntimeError, match="released"):      # another int8 form of it (SmoothQuant's)
        store.matmul(graph, [dataclasses.replace(found[0], row_scale=np.full(64, 2.0, np.float32))])


@pytest.mark.parametrize("rows", [1, 8, 128])
@pytest.mark.parametrize("per_channel", [False, True])
def test_conv_form_is_int32_exact_and_equals_the_matmul_form(rows, per_channel):
    """The 1x1 convolution's int32 output is the int64 product of the quantized activation and
    the int8 weight plus the compensated bias, exactly; scaled to float it equals the inner
    product's output within float32 rounding, and both match float64 within int8's error."""
    rng = np.random.RandomState(rows)
    x = (rng.randn(rows, 256) + 0.7).astype(np.float32)   # a zero point away from 0
    w = (rng.randn(256, 192) * 0.05 * np.linspace(0.2, 2.0, 192)).astype(np.float32)
    bias = (rng.randn(192) * 0.3).astype(np.float32)
    graph = savedmodel.matmul_graph(x, w, bias)
    found = sites.find_matmul_sites(graph)
    ranges = {"x": (float(x.min()) - 0.5, float(x.max()))}
    store = weights.Int8Weights(per_channel)
    conv = int8_matmul.fuse_int8_matmuls(graph.copy(), found, ranges, store, int8_matmul.CONV)
    matmul = int8_matmul.fuse_int8_matmuls(graph.copy(), found, ranges, store, int8_matmul.MATMUL)
    dummy = tf.zeros([1, 1], tf.int32)
    name = found[0].matmul
    q, acc, out_conv = conv.function(["x/quantize_u8", f"{name}/rows_int32", "out"])(dummy, dummy)
    out_matmul = matmul.function(["out"])(dummy, dummy)[0].numpy()
    q_w, _, _ = store.matmul(graph, found)
    bias_int32 = next(n for n in conv.graph_def.node if n.name == f"{name}/bias_int32")
    expected = (tf.bitcast(q, tf.uint8).numpy().astype(np.int64) @ q_w.numpy().astype(np.int64)
                + tf.make_ndarray(bias_int32.attr["value"].tensor).astype(np.int64))
    np.testing.assert_array_equal(acc.numpy(), expected)
    out_conv = out_conv.numpy()
    assert np.abs(out_conv - out_matmul).max() <= 1e-5 * np.abs(out_matmul).max()
    ref = x.astype(np.float64) @ w.astype(np.float64) + bias
    assert np.abs(out_conv - ref).mean() / np.abs(ref).mean() < 0.03


@pytest.mark.parametrize("per_channel", [False, True])
def test_qdq_form_matches_float64_and_stores_int8(per_channel):
    rng = np.random.RandomState(1)
    x = rng.randn(32, 256).astype(np.float32)
    w = (rng.randn(256, 128) * 0.05).astype(np.float32) * np.linspace(0.1, 2.0, 128, dtype=np.float32)
    graph = savedmodel.matmul_graph(x, w)
    out_graph = qdq.insert_qdq_pairs(graph, sites.find_matmul_sites(graph), {"x": (float(x.min()), float(x.max()))},
                                     weights.Int8Weights(per_channel))
    out_graph = savedmodel.prune(out_graph)
    stored = [v for v in out_graph.variables()]
    assert [v.dtype for v in stored] == [tf.int8]
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert np.abs(_run(out_graph) - ref).mean() / np.abs(ref).mean() < 0.03


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
def test_matmuls_reading_one_tensor_share_one_kernel(per_channel, smooth):
    """Two Dense layers reshape x with nodes of their own (as Tensordot does) and one reads -x:
    the first two become one kernel split in two, the third keeps its own, all match float64;
    SmoothQuant smooths the shared tensor once, for both weights."""
    rng = np.random.RandomState(4)
    x = (rng.randn(64, 512) + 0.5).astype(np.float32)
    w = [(rng.randn(512, n) * 0.02 * (i + 1)).astype(np.float32) for i, n in enumerate((96, 160, 64))]
    bias = (rng.randn(160) * 0.1).astype(np.float32)
    nodes = [make_node("Placeholder", "input_ids", [], dtype=tf.int32),
             make_node("Placeholder", "attention_mask", [], dtype=tf.int32),
             make_node("Placeholder", "x", [], dtype=tf.float32),
             make_node("Neg", "negative", ["x"], T=tf.float32)]
    for i, source in enumerate(("x", "x", "negative")):
        nodes += [make_const(f"shape{i}", [64, 512], tf.int32),
                  make_node("Reshape", f"flat{i}", [source, f"shape{i}"], T=tf.float32, Tshape=tf.int32),
                  make_resource_placeholder(f"w{i}"),
                  make_node("ReadVariableOp", f"w{i}/read", [f"w{i}"], dtype=tf.float32),
                  make_node("MatMul", f"mm{i}", [f"flat{i}", f"w{i}/read"], T=tf.float32,
                            transpose_a=False, transpose_b=False)]
    nodes += [make_resource_placeholder("b"), make_node("ReadVariableOp", "b/read", ["b"], dtype=tf.float32),
              make_node("BiasAdd", "out1", ["mm1", "b/read"], T=tf.float32)]
    graph_def = tf.compat.v1.GraphDef()
    graph_def.node.extend(nodes)
    feeds = {"x": tf.constant(x), "b": tf.Variable(bias), **{f"w{i}": tf.Variable(w[i]) for i in range(3)}}
    graph = savedmodel.ServingGraph(graph_def, {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                                    {"logits": "mm0:0"}, feeds)

    graph, found = sites.share_equal_inputs(graph, sites.find_matmul_sites(graph))
    assert [s.activation for s in found] == ["flat0", "flat0", "flat2"]
    dummy = (np.zeros((1, 1), np.int32),) * 2
    ranges = calibration.collect_activation_ranges(graph, ["flat0", "flat2"], [dummy])
    assert ranges["flat0"] == pytest.approx((x.min(), x.max()))
    if smooth:
        graph, found, ranges = smoothquant.smooth_activations(graph, found, ranges, 0.5)
        assert found[0].activation == found[1].activation != found[2].activation
    fused = int8_matmul.fuse_int8_matmuls(graph, found, ranges, weights.Int8Weights(per_channel))
    ops = [n.op for n in fused.graph_def.node]
    assert sum(_kernel_ops(fused).values()) == 2 and ops.count("SplitV") == 1 and ops.count("QuantizeV2") == 2
    assert sum(n.name.endswith("/smooth") for n in fused.graph_def.node) == (2 if smooth else 0)
    assert "MatMul" not in ops
    outs = fused.function(["mm0", "out1", "mm2"])(*map(tf.constant, dummy))
    x64 = x.astype(np.float64)
    for out, ref in zip(outs, (x64 @ w[0], x64 @ w[1] + bias, -x64 @ w[2])):
        assert np.abs(out.numpy() - ref).mean() / np.abs(ref).mean() < 0.03


def _quantized(w, axis, block_elements):
    absmax, blocks = weights.quantized_blocks(w, axis, block_elements)
    blocks = list(blocks)
    assert [(i, j) for i, j, _ in blocks] == weights._row_blocks(w, block_elements)
    return np.concatenate([q for _, _, q in blocks]), absmax


def test_symmetric_quantization_in_blocks_equals_whole():
    rng = np.random.RandomState(2)
    w = rng.randn(100, 30).astype(np.float32)
    q_whole, a_whole = _quantized(w, axis=1, block_elements=10 ** 9)
    q_blocks, a_blocks = _quantized(tf.Variable(w), axis=1, block_elements=90)
    assert q_blocks.dtype == np.int8
    np.testing.assert_array_equal(q_whole, q_blocks)
    np.testing.assert_array_equal(a_whole, a_blocks)
    q_cols, a_cols = _quantized(tf.Variable(w), axis=0, block_elements=90)
    np.testing.assert_array_equal(a_cols, np.abs(w).max(axis=0))
    assert np.abs(q_cols.astype(np.float32) * (a_cols[None, :] / 127) - w).max() <= a_cols.max() / 254 + 1e-6
    assert np.abs(q_whole.astype(np.float32) * (a_whole[:, None] / 127) - w).max() <= a_whole.max() / 254 + 1e-6


class _WideModel(tf.Module):
    """logits = embedding(input_ids) @ W, W being 8192 x 70000 float32 (2.29 GB)."""

    def __init__(self):
        rng = np.random.RandomState(3)
        self.emb = tf.Variable(rng.randn(64, 8192).astype(np.float32))
        self.w = tf.Variable(tf.random.stateless_uniform([8192, 70000], [1, 2], -0.02, 0.02))

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="input_ids"),
                                  tf.TensorSpec([None, None], tf.int32, name="attention_mask")])
    def serve(self, input_ids, attention_mask):
        h = tf.gather(self.emb, input_ids)
        flat = tf.reshape(h, [-1, 8192])
        return {"logits": tf.reshape(tf.matmul(flat, self.w), [tf.shape(input_ids)[0], -1, 70000])}


def test_model_with_weights_over_2gb_converts(tmp_path):
    src = tmp_path / "wide"
    module = _WideModel()
    assert module.w.shape.num_elements() * 4 > 2 ** 31
    tf.saved_model.save(module, str(src), signatures={"serving_default": module.serve})
    del module
    loaded, fn = savedmodel.load_serving_function(src)
    graph = savedmodel.extract_serving_graph(loaded, fn)
    assert graph.graph_def.ByteSize() < 1 << 20           # the weights are not in the protobuf
    found = sites.find_matmul_sites(graph)
    assert len(found) == 1
    ids = np.arange(16, dtype=np.int32)[None]
    batch = (ids, np.ones_like(ids))
    ranges = calibration.collect_activation_ranges(graph, [found[0].activation], [batch])
    store = weights.Int8Weights(per_channel=False)
    graph = int8_matmul.fuse_int8_matmuls(graph, found, ranges, store)
    graph = savedmodel.prune(weights.quantize_embeddings(graph, sites.find_embeddings(graph), store))
    assert graph.graph_def.ByteSize() < 1 << 20
    dst = savedmodel.save_serving_graph(graph, tmp_path / "wide_int8")
    assert savedmodel.saved_model_size(dst) < 0.3 * savedmodel.saved_model_size(src)
    ref = fn(input_ids=tf.constant(ids), attention_mask=tf.constant(batch[1]))["logits"].numpy()
    del graph, loaded, fn
    int8 = tf.saved_model.load(str(dst)).signatures["serving_default"]
    out = int8(input_ids=tf.constant(ids), attention_mask=tf.constant(batch[1]))["logits"].numpy()
    cos = (out * ref).sum() / np.linalg.norm(out) / np.linalg.norm(ref)
    assert cos > 0.999, cos


@pytest.mark.parametrize("fuse", [True, False])
def test_smooth_quant_keeps_the_product_and_tames_an_outlier_channel(fuse):
    rng = np.random.RandomState(4)
    x = rng.randn(64, 256).astype(np.float32)
    x[:, 7] *= 60.0                                   # one outlier channel, as in LLM activations
    w = (rng.randn(256, 128) * 0.05).astype(np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    graph = savedmodel.matmul_graph(x, w)
    dummy = (np.zeros((1, 1), np.int32),) * 2
    found = sites.find_matmul_sites(graph)
    ranges = calibration.collect_activation_ranges(graph, [found[0].activation], [dummy])
    errors = {}
    for alpha in (None, 0.5):
        g = savedmodel.ServingGraph(graph.graph_def.__deepcopy__(), graph.inputs, graph.outputs, dict(graph.feeds))
        s, r = found, ranges
        if alpha is not None:
            g, s, r = smoothquant.smooth_activations(g, found, ranges, alpha)
            assert r[s[0].activation][1] < ranges["x"][1] / 5          # the range int8 must cover shrank
        g = (int8_matmul.fuse_int8_matmuls if fuse else qdq.insert_qdq_pairs)(g, s, r, weights.Int8Weights(False))
        errors[alpha] = np.abs(_run(g) - ref).mean() / np.abs(ref).mean()
    assert errors[0.5] < 0.5 * errors[None], errors


def test_slow_kernels_stay_fp32_each_shape_is_timed_once_and_the_faster_form_is_chosen():
    """choose_kernels with a timer that finds int8 10% slower for the widest group only: that
    group is kept in FP32, the other takes the form the timer finds fastest (the convolution at
    one row, the inner product at 8, where the convolution is faster by less than TIE_MARGIN), and
    a shape seen again (another signature) is not timed again; where another signature already
    reads the weight in int8, 10% is not enough to store an FP32 copy beside it. Each group is timed
    on the model's own variables, not on copies."""
    rng = np.random.RandomState(6)
    timed, own = [], set()

    def timer(shape, per_channel, forms, weights_and_biases):
        timed.append(shape)
        assert [tuple(w.shape) for w, _ in weights_and_biases] == [(shape.depth, n) for n in shape.widths]
        assert [b is not None for _, b in weights_and_biases] == list(shape.biases)
        assert {id(v) for pair in weights_and_biases for v in pair if v is not None} <= own
        conv = 0.2 if shape.rows == 1 else 0.49
        return kernel_choice.Timing(1.0, {"matmul": 1.1 if sum(shape.widths) > 100 else 0.5, "conv": conv}
                                    if sum(shape.widths) <= 100 else {"matmul": 1.1, "conv": 1.2})

    timings = {}
    for rows in (8, 1):
        x = rng.randn(rows, 64).astype(np.float32)
        graph = savedmodel.matmul_graph(x, [(rng.randn(64, n) * 0.1).astype(np.float32) for n in (32, 48)])
        wide = savedmodel.matmul_graph(x, (rng.randn(64, 512) * 0.1).astype(np.float32), np.zeros(512, np.float32))
        own |= {id(v) for g in (graph, wide) for v in g.variables()}
        for g in (graph, wide, wide):
            chosen = kernel_choice.choose_kernels(g, sites.find_matmul_sites(g), {"x": rows}, timings, timer=timer)
            assert [c[0] for c in chosen.values()] == (["fp32"] if g is wide else ["conv" if rows == 1 else "matmul"])
    assert [(s.rows, s.depth, s.widths, s.biases) for s in timed] == [
        (8, 64, (32, 48), (False, False)), (8, 64, (512,), (True,)), (1, 64, (32, 48), (False, False)),
        (1, 64, (512,), (True,))]
    found = sites.find_matmul_sites(wide)
    int8_elsewhere = {sites.weight_key(wide, found[0])}
    chosen = kernel_choice.choose_kernels(wide, found, {"x": 1}, timings, int8_elsewhere, timer=timer)
    assert [c[0] for c in chosen.values()] == ["matmul"]


def test_group_timing_runs_every_form_at_the_shape():
    shape = kernel_choice.GroupShape(4, 128, (64, 96), (False, True))
    t = kernel_choice.time_group(shape, budget_s=0.05)
    assert t.fp32_ms > 0 and sorted(t.int8_ms) == sorted(int8_matmul.FORMS) and min(t.int8_ms.values()) > 0
    assert str(shape) == "4 x 128 @ 128 x 64+96"
    assert kernel_choice.time_group(shape, forms=("conv",), budget_s=0.05).int8_ms.keys() == {"conv"}


def test_conv_and_matmul_forms_agree_on_the_bundled_model(bundled_fp32):
    """The bundled model's serving graph with every MatMul in each form, on the same int8 weights
    and ranges: the same next token at every position. Their kernels' float outputs differ by
    float32 rounding alone (test above); a following QuantizeV2 can round such a value to the
    next level, so through four layers the logits differ slightly more than one kernel's output."""
    from gptj_int8 import data, models
    loaded, fn = savedmodel.load_serving_function(bundled_fp32)
    graph = savedmodel.extract_serving_graph(loaded, fn)
    graph, found = sites.share_equal_inputs(graph, sites.find_matmul_sites(graph))
    tokenizer = models.load_tokenizer(bundled_fp32)
    batches = data.batches(data.encode_passages(tokenizer, data.load_passages(data.CALIBRATION_SET, 8),
                                                models.context_length(bundled_fp32)), 1, tokenizer.pad_token_id)
    ranges = calibration.collect_activation_ranges(graph, [s.activation for s in found], batches[:4])
    store = weights.Int8Weights(True)
    logits = {}
    for form in int8_matmul.FORMS:
        fused = int8_matmul.fuse_int8_matmuls(graph.copy(), found, ranges, store, form)
        assert _kernel_ops(fused)[form] == 13
        run = fused.function()
        logits[form] = np.concatenate([run(tf.constant(b[0]), tf.constant(b[1]))[0].numpy().reshape(-1, 4096)
                                       for b in batches[4:]])
    a, b = logits[int8_matmul.MATMUL], logits[int8_matmul.CONV]
    assert (a.argmax(-1) == b.argmax(-1)).all()
    assert np.abs(a - b).mean() <= 1e-3 * np.abs(a).mean()
    cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    # INT8 against FP32 is about 0.9998 at a position on this model; the two forms are far closer
    assert cos.mean() > 0.99999 and cos.min() > 0.9995, (cos.mean(), cos.min())


def _convert_tiny_timed_by(timer, steps, tiny_fp32, tmp_path, monkeypatch, caplog):
    """(converter, its log) of the tiny model converted with `timer` for kernel_choice.time_group and
    `steps` for kernel_choice.time_steps."""
    import logging
    from convert import ConvertSavedModel
    from gptj_int8 import data, models
    monkeypatch.setattr(kernel_choice, "time_group", timer)
    monkeypatch.setattr(kernel_choice, "time_steps", steps)
    tok = models.load_tokenizer(tiny_fp32)
    batches = data.batches(data.encode_passages(tok, data.load_passages(data.CALIBRATION_SET, 4), 256), 1,
                           tok.pad_token_id)
    converter = ConvertSavedModel(tiny_fp32, tmp_path / "int8", batches, tmp_path / "out")
    with caplog.at_level(logging.INFO):
        converter()
    return converter, caplog.text


def test_conversion_honours_and_logs_each_timed_choice(tiny_fp32, tmp_path, monkeypatch, caplog):
    """With a timer that makes FP32 fastest for the 64-wide out_proj, the convolution fastest at one
    row and the inner product elsewhere, the converted signatures hold exactly those kernels, the
    log names every timed shape with its times and choice, and quantize.py's log line per
    signature counts each form."""
    import convert

    def timer(shape, per_channel, forms, weights_and_biases):
        fp32 = 0.5 if shape.widths == (64,) and shape.depth == 64 else 1.0
        return kernel_choice.Timing(fp32, {"matmul": 0.9, "conv": 0.8 if shape.rows == 1 else 0.95})

    def steps(graphs, inputs):   # whole steps: FP32 alone, then as chosen (the fastest) and all int8
        return [2.0] if len(graphs) == 1 else [1.0] + [1.5] * (len(graphs) - 1)

    monkeypatch.setattr(convert, "STEP_REFILL_BYTES", 0)   # as at GPT-J-6B's width: FP32 timed before converting
    converter, log = _convert_tiny_timed_by(timer, steps, tiny_fp32, tmp_path, monkeypatch, caplog)
    assert "-> fp32" in log and "-> conv" in log and "-> matmul" in log
    assert "int8 matmul 0.900 ms, int8 conv 0.800 ms -> conv" in log
    # per layer: q+k+v+fc_in, out_proj (FP32), fc_out; and the lm_head
    assert converter.kernel_forms == {"serving_default": {"matmul": 5}, "prefill": {"matmul": 4, "conv": 1},
                                      "decode": {"conv": 5}}
    assert len(converter.kept_for_speed["decode"]) == 2
    assert "decode, whole step (FP32 timed before converting): as chosen 1.000 ms, all int8 1.500 ms, FP32 2.000 ms -> as chosen" in log
    for step, dump in (("serving_default", "converted_graph_def.pb"), ("prefill", "converted_prefill_graph_def.pb"),
                       ("decode", "converted_decode_graph_def.pb")):
        g = tf.compat.v1.GraphDef()
        g.ParseFromString((tmp_path / "out" / dump).read_bytes())
        ops = [n.op for n in g.node]
        assert {f: ops.count(op) for f, op in int8_matmul.KERNEL_OPS.items() if op in ops} == converter.kernel_forms[step]
        assert ops.count("MatMul") == 2
        assert f"{step}: 13 MatMuls -> 5 int8 kernels" not in log   # the FP32 ones are not counted as int8
        assert f"{step}: 11 MatMuls -> 5 int8 kernels" in log


def test_each_signature_keeps_the_fastest_whole_step(tiny_fp32, tmp_path, monkeypatch, caplog):
    """Kernels timed one by one keep out_proj FP32 everywhere; then whole steps decide: in
    serving_default every MatMul int8 is fastest, in decode FP32 (its released weights read back
    from the source model's checkpoint), in prefill the kernels as chosen."""
    from gptj_int8.generation import CACHE

    def timer(shape, per_channel, forms, weights_and_biases):
        return kernel_choice.Timing(0.5 if shape.widths == (64,) and shape.depth == 64 else 1.0, {"matmul": 0.9})

    def steps(graphs, inputs):   # as chosen, all int8, FP32, called in turn
        signature = "decode" if len(inputs) == 3 else "prefill" if CACHE in graphs[0].outputs else "serving_default"
        return {"serving_default": [1.5, 1.2, 2.0], "prefill": [1.2, 1.5, 2.0], "decode": [1.5, 1.4, 1.0]}[signature]

    converter, log = _convert_tiny_timed_by(timer, steps, tiny_fp32, tmp_path, monkeypatch, caplog)
    assert converter.kernel_forms == {"serving_default": {"matmul": 7}, "prefill": {"matmul": 5}, "decode": {}}
    assert converter.kept_for_speed["serving_default"] == []
    assert len(converter.kept_for_speed["prefill"]) == 2 and len(converter.kept_for_speed["decode"]) == 13
    assert "decode, whole step: as chosen 1.500 ms, all int8 1.400 ms, FP32 1.000 ms -> FP32" in log
    assert "serving_default, whole step: as chosen 1.500 ms, all int8 1.200 ms, FP32 2.000 ms -> all int8" in log

    fp32, int8 = tf.saved_model.load(str(tiny_fp32)), tf.saved_model.load(str(tmp_path / "int8"))
    ids = tf.constant([[5, 6, 7, 8]])
    past = fp32.signatures["prefill"](input_ids=ids, attention_mask=tf.ones_like(ids))[CACHE]
    outs = [m.signatures["decode"](input_ids=tf.constant([[9]]), attention_mask=tf.ones([1, 5], tf.int32),
                                   past_key_values=tf.identity(past))["logits"].numpy() for m in (fp32, int8)]
    # decode is the FP32 model's own again, on its weights read back from the checkpoint
    np.testing.assert_array_equal(outs[0], outs[1])
    nodes = savedmodel.read_graph_def(tmp_path / "out" / "converted_decode_graph_def.pb").node
    ops = [n.op for n in nodes]
    assert ops.count("MatMul") == 13 and not set(int8_matmul.KERNEL_OPS.values()) & set(ops)
    assert not any(n.name.endswith("/rows_int8") for n in nodes)   # nor the int8 embedding
