"""Right on every CPU: the conversion's kernel choices (FP32 or an int8 form per group of MatMuls,
per signature) are what a CPU's timing decides, so here they are given instead of timed: none, some
and all groups kept FP32, differently per signature, each int8 form, and keep_fp32, crossed with
every quality flag. Every signature of each conversion is checked against FP32: serving_default's
logits, prefill + decode under teacher forcing, and generate's tokens."""
import numpy as np
import pytest
import tensorflow as tf

from gptj_int8 import benchmark, data, generation, models
from gptj_int8.generation import CACHE
from gptj_int8.kernel_choice import FP32

PROMPT, STEPS, PROMPTS = 12, 4, 16


def all_int8(form):
    return lambda signature, layers, shape: form


def all_fp32(signature, layers, shape):
    return FP32


def mixed(signature, layers, shape):
    """The attention's out_proj FP32 in serving_default and prefill (as an AMX Xeon's timing chose at
    width 256); in decode also q/k/v/fc_in and fc_out; the two forms elsewhere, by rows."""
    kept = ("out_proj",) if signature != "decode" else ("out_proj", "q_proj", "fc_out")
    if any(k in layer for k in kept for layer in layers):
        return FP32
    return "conv" if shape.rows == 1 else "matmul"


def mixed_inverse(signature, layers, shape):
    """mixed's complement: what it keeps FP32 is int8, and what it makes int8, FP32."""
    return {FP32: "conv" if signature == "decode" else "matmul"}.get(mixed(signature, layers, shape), FP32)


# (id, ConvertSavedModel flags, choice); each pairs a quality flag with a choice pattern
CASES = [
    ("default-mixed", {}, mixed),
    ("smooth-mixed", {"smooth_quant": True}, mixed),
    ("smooth-mixed-inverse", {"smooth_quant": True}, mixed_inverse),
    ("all-fp32", {}, all_fp32),
    ("smooth-keep-fp32-all-matmul", {"smooth_quant": True, "keep_fp32": "out_proj,lm_head"}, all_int8("matmul")),
    ("per-tensor-mixed-inverse", {"per_channel": False}, mixed_inverse),
    # a bound no conversion meets: the fallback keeps every MatMul FP32, the smoothed ones too
    ("fallback-smooth", {"max_accuracy_drop": -100.0, "smooth_quant": True}, all_int8("matmul")),
    ("itex-smooth-keep-fp32", {"itex_mode": True, "smooth_quant": True, "keep_fp32": "fc_out,lm_head"}, None),
    ("perf-mixed-keep-fp32", {"performance_only": True, "keep_fp32": "h_._1/mlp/fc_in"}, mixed),
]


@pytest.fixture(scope="module")
def reference(tiny_fp32):
    """The passages, and what the FP32 model computes on them for every check."""
    tok = models.load_tokenizer(tiny_fp32)
    seqs = data.encode_passages(tok, data.load_passages(data.CALIBRATION_SET, 40), models.context_length(tiny_fp32))
    calib, held_out = seqs[:16], [s for s in seqs[16:] if len(s[0]) >= PROMPT + STEPS][:PROMPTS]
    assert len(held_out) == PROMPTS
    ids = np.array([s[0][:PROMPT + STEPS] for s in held_out], np.int32)
    fp32 = tf.saved_model.load(str(tiny_fp32))
    return {"calib": data.batches(calib, 1, tok.pad_token_id), "holdout": data.batches(held_out[:8], 8, tok.pad_token_id),
            "ids": ids, "fp32": signature_outputs(fp32, ids)}


def signature_outputs(model, ids):
    """{check: logits or tokens} of every signature of `model` on the passages' tokens `ids`:
    serving_default's logits at every position; decode's logits at each of STEPS steps after a
    prefill of PROMPT tokens, fed the passage's own next tokens; generate's STEPS new tokens."""
    s = model.signatures
    serving = s["serving_default"](input_ids=tf.constant(ids), attention_mask=tf.ones_like(ids))["logits"].numpy()
    prompt = tf.constant(ids[:, :PROMPT])
    out = s["prefill"](input_ids=prompt, attention_mask=tf.ones_like(prompt))
    steps = [out["logits"].numpy()]
    for k in range(PROMPT, PROMPT + STEPS - 1):
        out = s["decode"](input_ids=tf.constant(ids[:, k:k + 1]), attention_mask=tf.ones([len(ids), k + 1], tf.int32),
                          past_key_values=out[CACHE])
        steps.append(out["logits"].numpy())
    generated = s["generate"](**generation.generate_inputs(s["generate"], prompt, tf.ones_like(prompt), STEPS))
    generated = generated["sequences"].numpy()[:, PROMPT:]
    return {"serving": serving.reshape(-1, serving.shape[-1]), "steps": np.concatenate(steps), "generated": generated}


def figures(ref, int8):
    """{check: (argmax agreement, mean logit cosine)}; for generate, (share of prompts whose first new
    token equals FP32's, share of new tokens equal to FP32's)."""
    out = {k: (benchmark.argmax_agreement(ref[k], int8[k]), benchmark.logit_cosine(ref[k], int8[k]))
           for k in ("serving", "steps")}
    out["generated"] = (float(np.mean(ref["generated"][:, 0] == int8["generated"][:, 0])),
                        float(np.mean(ref["generated"] == int8["generated"])))
    return out


@pytest.mark.parametrize("flags,choice", [pytest.param(f, c, id=i) for i, f, c in CASES])
def test_every_signature_agrees_with_fp32_whatever_the_choices(flags, choice, reference, tiny_fp32, tmp_path):
    from convert import ConvertSavedModel
    converter = ConvertSavedModel(tiny_fp32, tmp_path / "int8", reference["calib"], tmp_path / "out",
                                  holdout_batches=reference["holdout"], kernel_choice=choice,
                                  force_int8=choice is None, **flags)
    converter()
    int8 = tf.saved_model.load(str(tmp_path / "int8"))
    got = figures(reference["fp32"], signature_outputs(int8, reference["ids"]))
    # what the conversion was given shows in its graphs
    if choice is all_fp32:
        assert converter.kernel_forms == {s: {} for s in ("serving_default", "prefill", "decode")}
    elif choice is mixed:
        assert converter.kept_for_speed["decode"] != converter.kept_for_speed["serving_default"]
        assert set(converter.kernel_forms["serving_default"]) == {"matmul"}
        assert set(converter.kernel_forms["decode"]) == {"conv"}
    if "max_accuracy_drop" in flags:
        assert len(converter.kept_in_fp32) == 13 and converter.kernel_forms["serving_default"] == {}
    if "keep_fp32" in flags:
        assert converter.kept_by_request
        assert all(any(p in layer for p in flags["keep_fp32"].split(",")) for layer in converter.kept_by_request)
    for check in ("serving", "steps"):
        agreement, cosine = got[check]
        assert agreement >= 0.8 and cosine >= 0.998, (check, got)
    first, tokens = got["generated"]
    assert first >= 0.75 and tokens >= 0.6, got
