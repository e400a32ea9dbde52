"""What both benches do: build models with the project's own scripts, and compare two SavedModels."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RUNS = REPO / "bench" / "runs"
# GPT-J-6B's shape (GPTJConfig's defaults) with fewer layers.
GPTJ_6B_WIDTH = "n_embd=4096,n_head=16,rotary_dim=64,n_inner=16384,vocab_size=50400"
GPTJ_6B_LAYERS = 28


def script(name, *args, **popen):
    """Start one of the project's scripts as a user would run it."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, str(REPO / name), *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def check(proc, what):
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{err[-2000:]}")


def prepare(name, n_layer=None):
    """FP32 SavedModel: GPT-J-6B's width with `n_layer` random layers, or the bundled model."""
    out = RUNS / name
    if not (out / "saved_model.pb").exists():
        RUNS.mkdir(parents=True, exist_ok=True)
        if n_layer is None:
            check(script("prepare_model.py", "--output_dir", out, "--overwrite", cwd=RUNS), "prepare " + name)
        else:
            check(script("prepare_model.py", "--random_init", "--config_overrides",
                         f"{GPTJ_6B_WIDTH},n_layer={n_layer}", "--output_dir", out, "--overwrite", cwd=RUNS),
                  "prepare " + name)
    return out


def timing_batch(model_dir, seq_len=128):
    """One (input_ids, attention_mask) of `seq_len` real tokens from the bundled passages."""
    from gptj_int8 import data, models
    tok = models.load_tokenizer(model_dir)
    ids = [t for text in data.load_passages(data.EVALUATION_SET, 40) for t in tok(text)["input_ids"]][:seq_len]
    return data.pad_batch([ids], tok.pad_token_id)


def fidelity(fp32_fn, int8_fn, batch):
    """Logit cosine and argmax agreement over every position of `batch`."""
    import tensorflow as tf
    from gptj_int8 import benchmark
    feed = dict(input_ids=tf.constant(batch[0]), attention_mask=tf.constant(batch[1]))
    a, b = fp32_fn(**feed)["logits"].numpy(), int8_fn(**feed)["logits"].numpy()
    return benchmark.logit_cosine(a, b), benchmark.argmax_agreement(a, b)


def size_gb(path):
    from gptj_int8 import savedmodel
    return savedmodel.saved_model_size(path) / 1e9


def median_ms(seconds):
    return float(np.median(seconds) * 1000)
