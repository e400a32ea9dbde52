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
    if path.is_dir():
        raise UserError(f"expected a dataset file, got a folder: {path}")
    if not path.is_file():
        raise UserError(f"dataset file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline()
    except UnicodeDecodeError:
        raise UserError(f"dataset file is not JSON lines (not UTF-8 text): {path}")
    if not first.strip():
        raise UserError(f"dataset file is empty: {path}")
    try:
        row = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
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
    """(token ids, number of tokens of the last word) per passage.

    The context and the last word (with its leading space) are encoded apart and joined, as
    lm-evaluation-harness does for LAMBADA; with GPT-J's BPE that equals encoding the whole text.
    Passages longer than `max_length` keep their last tokens (the target is at the end); a passage
    whose context would be empty cannot be scored and is dropped. Both are counted in the log."""
    encoded, truncated = [], 0
    for text in texts:
        context, _, word = text.rstrip().rpartition(" ")
        ids = tokenizer(context)["input_ids"]
        target = tokenizer(" " + word)["input_ids"]
        ids = ids + target
        if len(ids) > max_length:
            ids, truncated = ids[-max_length:], truncated + 1
        if len(ids) > len(target):
            encoded.append((ids, len(target)))
    if truncated:
        log.info("%d of %d passages were longer than %d tokens and were cut at the front",
                 truncated, len(texts), max_length)
    if len(encoded) < len(texts):
        log.info("%d passages had no context before their last word and were skipped",
                 len(texts) - len(encoded))
    if not encoded:
        raise UserError("no passage has a context before its last word")
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


def batches_by_length(encoded, batch_size, pad_id):
    """[(passage indices, batch)] of encode_passages' output in batches of passages of about the same
    length (sorted by length, ties in passage order), so that padding costs little. A pure function
    of its arguments: the same passages and batch size always give the same batches."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), i))
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [(np.array(chunk), batches([encoded[i] for i in chunk], batch_size, pad_id)[0]) for chunk in chunks]


def batches(encoded, batch_size, pad_id):
    """Right-padded (input_ids, attention_mask, target lengths) batches of encode_passages' output."""
    out = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        input_ids, attention_mask = pad_batch([ids for ids, _ in chunk], pad_id)
        out.append((input_ids, attention_mask, np.array([n for _, n in chunk])))
    return out
