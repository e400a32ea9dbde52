"""The offline defaults: the KJV LAMBADA-style data and the small trained GPT-J."""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data" / "kjv_lambada"
MODEL = ROOT / "models" / "gptj-kjv"


def load_texts(name, cache_dir):
    import datasets

    rows = datasets.load_dataset("json", data_files=str(DATA / f"{name}.jsonl"), split="train",
                                 cache_dir=str(cache_dir))
    assert "text" in rows.column_names
    return list(rows["text"])


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    return load_texts("evaluation", tmp_path_factory.mktemp("hf_cache"))


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    return load_texts("calibration", tmp_path_factory.mktemp("hf_cache"))


def test_sizes(evaluation, calibration):
    assert len(evaluation) >= 1000
    assert len(calibration) > 0
    assert all(isinstance(t, str) and t for t in evaluation + calibration)


def test_evaluation_disjoint_from_calibration(evaluation, calibration):
    assert not set(evaluation) & set(calibration)
    calibration_text = "\n".join(calibration)
    assert not [t for t in evaluation if t in calibration_text]


def test_evaluation_not_in_training_text(evaluation):
    train = DATA / "train.txt"
    if not train.exists():
        pytest.skip("train.txt is not committed; run data/kjv_lambada/prepare.py to make it")
    text = train.read_text()
    assert not [t for t in evaluation if t in text]


def test_target_is_a_word_seen_in_the_context(evaluation, calibration):
    for text in evaluation + calibration:
        context, target = text.rsplit(" ", 1)
        assert target.isalpha(), text
        assert target.lower() in re.findall(r"[a-z]+", context.lower()), text


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoTokenizer, TFGPTJForCausalLM

    return TFGPTJForCausalLM.from_pretrained(MODEL), AutoTokenizer.from_pretrained(MODEL)


def test_model_fits_the_budget():
    assert (MODEL / "tf_model.h5").stat().st_size <= 25_000_000


def test_tokenizer(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert type(tokenizer).__name__ == "GPT2TokenizerFast"
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert len(tokenizer) <= model.config.vocab_size


def test_model_beats_chance(model_and_tokenizer, evaluation):
    model, tokenizer = model_and_tokenizer
    from gptj_int8 import data
    texts = evaluation[:50]
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    assert max(map(len, encoded)) < model.config.n_positions
    # one right-padded batch: a passage's tokens never attend to the padding after them
    ids, mask = data.pad_batch(encoded, tokenizer.pad_token_id)
    logits = model(input_ids=ids, attention_mask=mask).logits.numpy()
    hits = sum(int(logits[i, len(e) - 2].argmax() == e[-1]) for i, e in enumerate(encoded))
    assert hits / len(texts) > 0.10
