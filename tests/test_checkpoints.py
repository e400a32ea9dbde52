"""prepare_model.py reads GPT-J checkpoints written by transformers' PyTorch classes (safetensors,
float32/float16/bfloat16, sharded) without torch, and refuses broken ones with one line.

The checkpoints are written here with numpy and `safetensors`, in PyTorch's names and layouts as
transformers itself converts TF weights (`convert_tf_weight_name_to_pt_weight_name`), so the
loader's own name table is checked against transformers' rules, not against itself. The reference
logits come from a TF model filled by transformers' own `load_pytorch_state_dict_in_tf2_model`
from the same arrays, which needs no torch when given numpy.
"""
import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf
from safetensors.numpy import save_file

from conftest import REPO, run_script
from gptj_int8 import checkpoints, models
from gptj_int8.cli import UserError

TINY = dict(vocab_size=4096, n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_inner=256, n_positions=256)
TOKENIZER = REPO / "models" / "gptj-kjv"
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _gptj(config):
    from transformers import TFGPTJForCausalLM
    model = TFGPTJForCausalLM(config)
    model(tf.constant([[0, 1]], tf.int32))
    return model


@pytest.fixture(scope="module")
def tiny():
    """(TF model with random weights, its weights as a PyTorch GPTJForCausalLM state dict)."""
    from transformers import GPTJConfig
    from transformers.modeling_tf_pytorch_utils import apply_transpose, convert_tf_weight_name_to_pt_weight_name
    tf.keras.utils.set_random_seed(1)
    model = _gptj(GPTJConfig(**TINY))
    # LayerNorm and biases start as 1 and 0: make them random too, so a swapped pair shows
    for v in model.variables:
        v.assign(tf.random.normal(v.shape, stddev=0.2) + (1.0 if "gamma" in v.name else 0.0))
    state = {}
    for v in model.variables:
        name, transpose = convert_tf_weight_name_to_pt_weight_name(v.name, tf_weight_shape=v.shape)
        # contiguous: safetensors writes a transposed view's memory in its untransposed order
        state[name] = np.ascontiguousarray(apply_transpose(transpose, v.numpy(), pt_to_tf=False))
    return model, state


def write_checkpoint(folder, config, state, dtype="float32", shards=1, buffers=True):
    """A folder as GPTJForCausalLM.save_pretrained writes it: config.json, model.safetensors (or
    shards and their index), and the tokenizer beside them."""
    folder.mkdir(parents=True)
    config_dict = config.to_dict()
    config_dict["architectures"] = ["GPTJForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config_dict))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / f, folder / f)
    tensors = {k: v.astype(DTYPES[dtype]) if v.dtype.kind == "f" else v for k, v in state.items()}
    if buffers:   # older transformers saved the causal mask buffers: not weights, to be ignored
        n = config.n_positions
        for i in range(config.n_layer):
            tensors[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((n, n), bool))[None, None]
            tensors[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e9, np.float32)
    if shards == 1:
        save_file(tensors, folder / checkpoints.SAFETENSORS, metadata={"format": "pt"})
        return folder
    names = list(tensors)
    weight_map = {}
    for s, part in enumerate(np.array_split(np.arange(len(names)), shards)):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({names[i]: tensors[names[i]] for i in part}, folder / shard, metadata={"format": "pt"})
        weight_map.update({names[i]: shard for i in part})
    (folder / checkpoints.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def reference_gptj(config, state, dtype):
    """A TF GPT-J filled by transformers' own PyTorch-to-TF loader from the checkpoint's values."""
    from transformers.modeling_tf_pytorch_utils import load_pytorch_state_dict_in_tf2_model
    model = _gptj(config)
    widened = {k: v.astype(DTYPES[dtype]).astype(np.float32) for k, v in state.items()}
    load_pytorch_state_dict_in_tf2_model(model, widened)
    return model


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, TINY["vocab_size"], (2, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    return ids, mask


def _logits(model, ids, mask):
    return model(input_ids=tf.constant(ids), attention_mask=tf.constant(mask), training=False).logits.numpy()


def _saved_model_logits(path, ids, mask):
    loaded = tf.saved_model.load(str(path))
    fn = loaded.signatures["serving_default"]
    return fn(input_ids=tf.constant(ids), attention_mask=tf.constant(mask))["logits"].numpy()


def test_sharded_float16_checkpoint_through_prepare_model(tmp_path, tiny):
    """prepare_model.py, as a user runs it, on float16 shards: the SavedModel gives transformers'
    logits for the same weights."""
    model, state = tiny
    folder = write_checkpoint(tmp_path / "ckpt", model.config, state, "float16", shards=3)
    out = tmp_path / "exported"
    proc = run_script("prepare_model.py", "--model", folder, "--output_dir", out, cwd=tmp_path)
    assert "safetensors (F16; 3 files)" in proc.stderr
    ids, mask = _batch()
    want = _logits(reference_gptj(model.config, state, "float16"), ids, mask)
    np.testing.assert_allclose(_saved_model_logits(out, ids, mask), want, rtol=1e-4, atol=1e-4)
    assert (out / "tokenizer.json").exists() and json.loads((out / "config.json").read_text())["n_layer"] == 2


def test_float32_checkpoint_exports_the_original_model(tmp_path, tiny):
    """One model.safetensors in float32 holds the original weights exactly: the exported
    SavedModel gives the original TF model's logits, and transformers' for the same arrays."""
    model, state = tiny
    folder = write_checkpoint(tmp_path / "ckpt", model.config, state, "float32")
    models.export_saved_model(models.pretrained_gptj(folder), tmp_path / "exported")
    ids, mask = _batch()
    got = _saved_model_logits(tmp_path / "exported", ids, mask)
    np.testing.assert_allclose(got, _logits(model, ids, mask), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, _logits(reference_gptj(model.config, state, "float32"), ids, mask),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_load_as_their_float32_values(tmp_path, tiny, dtype):
    """In process, without the export: rounded weights give transformers' logits for them, which
    are close to the original model's but not the same."""
    model, state = tiny
    folder = write_checkpoint(tmp_path / "ckpt", model.config, state, dtype)
    ids, mask = _batch()
    got = _logits(models.pretrained_gptj(folder), ids, mask)
    np.testing.assert_allclose(got, _logits(reference_gptj(model.config, state, dtype), ids, mask),
                               rtol=1e-4, atol=1e-4)
    original = _logits(model, ids, mask)
    assert not np.allclose(got, original, rtol=1e-6, atol=1e-6)
    assert np.mean(np.argmax(got, -1) == np.argmax(original, -1)) > 0.9


def test_loader_assigns_every_variable_from_the_checkpoint(tmp_path, tiny):
    """In process, no export: each TF variable holds exactly its checkpoint tensor, in TF layout."""
    model, state = tiny
    folder = write_checkpoint(tmp_path / "ckpt", model.config, state, "float32", shards=2)
    loaded = models.pretrained_gptj(folder)
    assert len(loaded.variables) == len(model.variables)
    for a, b in zip(loaded.variables, model.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)


def test_blocks_smaller_than_a_tensor_give_the_same_weights(tmp_path, tiny, monkeypatch):
    """Big tensors are assigned in row blocks; blocks of 1000 elements split every matrix."""
    model, state = tiny
    folder = write_checkpoint(tmp_path / "ckpt", model.config, state, "bfloat16")
    whole = models.pretrained_gptj(folder)
    monkeypatch.setattr(checkpoints, "BLOCK_ELEMENTS", 1000)
    blocked = models.pretrained_gptj(folder)
    for a, b in zip(blocked.variables, whole.variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    bf16 = state["lm_head.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(blocked.lm_head.kernel.numpy(), bf16.T)


def test_tied_embedding_fills_the_lm_head(tmp_path, tiny):
    model, state = tiny
    config = model.config.__class__(**{**TINY, "tie_word_embeddings": True})
    tied = {k: v for k, v in state.items() if k != "lm_head.weight"}
    folder = write_checkpoint(tmp_path / "ckpt", config, tied, buffers=False)
    loaded = models.pretrained_gptj(folder)
    np.testing.assert_array_equal(loaded.lm_head.kernel.numpy(), state["transformer.wte.weight"].T)


def test_same_logits_as_pytorch_gptj(tmp_path, tiny):
    torch = pytest.importorskip("torch")
    from transformers import GPTJForCausalLM
    model, state = tiny
    folder = write_checkpoint(tmp_path / "ckpt", model.config, state, buffers=False)
    ids, mask = _batch()
    with torch.no_grad():
        want = GPTJForCausalLM.from_pretrained(folder).eval()(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    got = _logits(models.pretrained_gptj(folder), ids, mask)
    np.testing.assert_allclose(got[mask == 1], want[mask == 1], rtol=1e-4, atol=1e-4)


# ----- bad checkpoints: one line naming the file or tensor, before any model is built -----

def _refused(folder, *words, revision=None):
    with pytest.raises(UserError) as e:
        checkpoints.locate_checkpoint(folder, revision)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    return message


def test_bad_checkpoints_are_refused_by_name(tmp_path, tiny):
    model, state = tiny
    config = model.config

    empty = tmp_path / "no-weights"
    write_checkpoint(empty, config, state)
    (empty / checkpoints.SAFETENSORS).unlink()
    _refused(empty, "no weights", "model.safetensors")

    _refused(tmp_path / "nowhere", "not found")
    _refused(write_checkpoint(tmp_path / "local", config, state), "--revision", revision="float16")

    no_config = write_checkpoint(tmp_path / "no-config", config, state)
    (no_config / "config.json").unlink()
    _refused(no_config, "config.json")

    other = write_checkpoint(tmp_path / "gpt2", config, state)
    (other / "config.json").write_text(json.dumps({**config.to_dict(), "model_type": "gpt2"}))
    _refused(other, "model_type", "gpt2")

    sharded = write_checkpoint(tmp_path / "missing-shard", config, state, shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()
    _refused(sharded, "model-00002-of-00003.safetensors", "missing")

    truncated = write_checkpoint(tmp_path / "truncated", config, state)
    data = (truncated / checkpoints.SAFETENSORS).read_bytes()
    (truncated / checkpoints.SAFETENSORS).write_bytes(data[:len(data) - 1000])
    _refused(truncated, "model.safetensors", "truncated")

    pickle_named_safetensors = write_checkpoint(tmp_path / "not-safetensors", config, state)
    (pickle_named_safetensors / checkpoints.SAFETENSORS).write_bytes(b"\x80\x02}q\x00(X\x06\x00\x00\x00weight" * 50)
    _refused(pickle_named_safetensors, "model.safetensors", "not a safetensors file")

    renamed = write_checkpoint(tmp_path / "renamed", config,
                               {k.replace("h.1.mlp.fc_in", "h.1.mlp.fc1"): v for k, v in state.items()})
    _refused(renamed, "transformer.h.1.mlp.fc_in.weight", "missing")

    extra = write_checkpoint(tmp_path / "extra", config, {**state, "transformer.h.2.ln_1.weight": state["transformer.ln_f.weight"]})
    _refused(extra, "transformer.h.2.ln_1.weight", "n_layer=2")

    wrong_shape = write_checkpoint(tmp_path / "shape", config, {**state, "lm_head.bias": state["lm_head.bias"][:100]})
    _refused(wrong_shape, "lm_head.bias", "[100]", "[4096]")

    integer = write_checkpoint(tmp_path / "int", config, {**state, "transformer.ln_f.bias": np.zeros(64, np.int64)})
    _refused(integer, "transformer.ln_f.bias", "I64")


def test_pickle_checkpoint_without_torch_says_how_to_convert(tmp_path, tiny):
    if checkpoints.torch_available():
        pytest.skip("torch is installed: transformers reads pytorch_model.bin itself")
    model, state = tiny
    folder = write_checkpoint(tmp_path / "bin", model.config, state)
    (folder / checkpoints.SAFETENSORS).unlink()
    (folder / checkpoints.PYTORCH).write_bytes(b"\x80\x02 not read")
    _refused(folder, "pytorch_model.bin", "needs torch", "model.safetensors")


def _missing_shard(folder):
    (folder / "model-00001-of-00002.safetensors").unlink()
    return "model-00001-of-00002.safetensors"


def _truncated_shard(folder):
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-4096])
    return "truncated"


def _another_architecture(folder):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neo"}))
    return "gpt_neo"


@pytest.mark.parametrize("breakage", [_missing_shard, _truncated_shard, _another_architecture])
def test_cli_refuses_a_broken_checkpoint_in_one_line_and_writes_nothing(tmp_path, tiny, breakage):
    model, state = tiny
    folder = write_checkpoint(tmp_path / "ckpt", model.config, state, shards=2)
    named = breakage(folder)
    out = tmp_path / "exported"
    proc = run_script("prepare_model.py", "--model", folder, "--output_dir", out, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and named in last, last
    assert not out.exists()
    assert not list(tmp_path.glob(".exported*"))
