"""LAMBADA-style passages: the bundled JSONL sets or a hub dataset, loaded through `datasets`."""
import json
import logging
from pathlib import Path

import numpy as np

from .cli import UserError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BUNDLED_DATA = REPO / "data" / "kjv_lambada"
CALIBRATION_SET = BUNDLED_DATA / "calibration.jsonl"
EVALUATION_SET = BUNDLED_DATA / "evaluation.jsonl"
HUB_SPLIT = "test"   # EleutherAI/lambada_openai has only a test split


def _check_jsonl(path):
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    if not first.strip():
        raise UserError(f"dataset file is empty: {path}")
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        raise UserError(f"dataset file is not JSON lines: {path}")
    if not isinstance(row, dict) or "text" not in row:
        raise UserError(f"dataset rows have no 'text' field: {path}")


def load_passages(dataset, limit=None):
    """The `text` of each passage: a local .json/.jsonl file, or a hub dataset id (test split)."""
    import datasets
    dataset = str(dataset)
    path = Path(dataset)
    if path.suffix in (".json", ".jsonl") or path.exists():
        _check_jsonl(path)
        try:
            rows = datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception as e:
            raise UserError(f"cannot read dataset {path}: {str(e).splitlines()[0]}")
    else:
        try:
            rows = datasets.load_dataset(dataset, split=HUB_SPLIT)
        except Exception as e:
            raise UserError(f"cannot load dataset {dataset}: {str(e).splitlines()[0]}")
    if "text" not in rows.column_names:
        raise UserError(f"dataset {dataset} has no 'text' field")
    texts = [t for t in rows["text"] if isinstance(t, str) and len(t.split()) >= 2]
    if not texts:
        raise UserError(f"dataset {dataset} has no usable passages")
    return texts[:limit] if limit else texts


def encode_passages(tokenizer, texts, max_length):
    """Token ids per passage, keeping the last `max_length` tokens (the target is at the end).
    Passages of fewer than two tokens cannot be scored and are dropped, with a count."""
    encoded, truncated = [], 0
    for ids in tokenizer(texts)["input_ids"]:
        if len(ids) > max_length:
            ids, truncated = ids[-max_length:], truncated + 1
        if len(ids) >= 2:
            encoded.append(ids)
    if truncated:
        log.info("%d of %d passages were longer than %d tokens and were cut at the front",
                 truncated, len(texts), max_length)
    if not encoded:
        raise UserError("no passage has at least two tokens")
    return encoded


def pad_batch(sequences, pad_id):
    """Right-padded int32 (input_ids, attention_mask) for a list of token id lists."""
    width = max(len(s) for s in sequences)
    input_ids = np.full((len(sequences), width), pad_id, np.int32)
    attention_mask = np.zeros((len(sequences), width), np.int32)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = seq
        attention_mask[row, :len(seq)] = 1
    return input_ids, attention_mask


def batches(sequences, batch_size, pad_id):
    return [pad_batch(sequences[i:i + batch_size], pad_id) for i in range(0, len(sequences), batch_size)]
