"""Train the small GPT-J bundled as the offline default model, models/gptj-kjv.

Corpus: data/kjv_lambada/train.txt, the King James Bible without the verses of the
evaluation passages (made by data/kjv_lambada/prepare.py).

Tokenizer: a byte-level BPE of 4096 entries trained on that text and saved as a
GPT2TokenizerFast (eos = bos = unk = pad = "<|endoftext|>"). GPT-J's own 50400-entry
vocabulary would not fit: at width 256 its input and output embeddings alone would take
2 x 50400 x 256 x 4 bytes = 103 MB, four times the 25 MB budget of the bundled model.

Model: transformers' TFGPTJForCausalLM, 4 layers, width 256, 8 heads, rotary_dim 16,
inner width 1024, 256 positions, no dropout: 5.3M parameters, a 21 MB fp32 tf_model.h5.
Training: random 128-token windows, batch 16, Adam (global norm clip 1.0), linear
warmup then cosine decay, one CPU thread, fixed seeds: rerunning gives the same model.

Measured run (defaults, one thread of a 2-core AMD EPYC, TF 2.21, transformers 4.57.6):
900,403 training tokens, 2200 steps (about 5 epochs) in 49 min, 1.1-1.5 s a step; final
train loss 2.87 (mean of the last 100 steps); on the 1500 evaluation passages the FP32
model predicts the last token in 37.5% and the whole last word in 31.4%. The figures of
each run go to training_log.json and README.md beside the model.

    python data/kjv_lambada/prepare.py
    python models/train_gptj_kjv.py
"""
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent

# -----------------------------------------------------------------------------
data_dir = str(ROOT / "data" / "kjv_lambada")  # train.txt and evaluation.jsonl
out_dir = str(ROOT / "models" / "gptj-kjv")  # model, tokenizer, training_log.json, README.md
seed = 1337  # weights, data order, everything random
bpe_vocab = 4096  # tokenizer entries, "<|endoftext|>" included
n_embd = 256  # model width
n_layer = 4  # transformer blocks
n_head = 8  # attention heads (head width n_embd / n_head)
rotary_dim = 16  # dimensions of each head that get rotary position embedding
n_inner = 1024  # MLP width
n_positions = 256  # longest sequence the model accepts
seq_len = 128  # training window, in tokens
batch_size = 16  # windows per step
max_steps = 2200  # optimizer steps (about 1.25 s each on one thread)
warmup_steps = 150  # linear warmup from 0 to learning_rate
learning_rate = 1.5e-3  # peak learning rate
min_lr_ratio = 0.1  # the cosine decays to learning_rate * this
eval_batch = 32  # passages per batch when scoring evaluation.jsonl
# -----------------------------------------------------------------------------

EOS = "<|endoftext|>"
log = logging.getLogger("train_gptj_kjv")


def train_tokenizer(text_file, save_dir):
    """Train the byte-level BPE on text_file and save it as a GPT2TokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(text_file)], vocab_size=bpe_vocab, min_frequency=2,
              special_tokens=[EOS], show_progress=False)
    save_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = bpe.save_model(str(save_dir))
    tokenizer = GPT2TokenizerFast(vocab_file=vocab, merges_file=merges, bos_token=EOS,
                                  eos_token=EOS, unk_token=EOS, pad_token=EOS)
    tokenizer.model_max_length = n_positions
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def tokenize_corpus(tokenizer, text_file):
    """All lines of text_file as one int32 token stream, lines separated by eos."""
    lines = Path(text_file).read_text().splitlines()
    ids = []
    for line_ids in tokenizer(lines, verbose=False)["input_ids"]:
        ids.extend(line_ids)
        ids.append(tokenizer.eos_token_id)
    return np.asarray(ids, dtype=np.int32)


def build_model(tokenizer):
    from transformers import GPTJConfig, TFGPTJForCausalLM

    config = GPTJConfig(
        vocab_size=64 * math.ceil(len(tokenizer) / 64), n_positions=n_positions, n_embd=n_embd,
        n_layer=n_layer, n_head=n_head, rotary_dim=rotary_dim, n_inner=n_inner,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False)
    model = TFGPTJForCausalLM(config)
    model(tf.zeros([1, seq_len], tf.int32))
    return model


def score_passages(model, tokenizer, texts, batch=32):
    """LAMBADA scores of texts: (last-token accuracy, last-word accuracy, longest in tokens).

    Last token: the argmax at the position before the last token is that token (the
    original INC example's metric). Last word: every token of the last word is the argmax
    given the tokens before it (greedy decoding reproduces the word).
    """
    token_hits = word_hits = longest = 0
    for i in tqdm(range(0, len(texts), batch), desc="scoring", unit="batch"):
        encoded = [tokenizer(t)["input_ids"] for t in texts[i:i + batch]]
        word_len = [len(tokenizer(" " + t.rsplit(" ", 1)[1])["input_ids"]) for t in texts[i:i + batch]]
        width = max(map(len, encoded))
        longest = max(longest, width)
        ids = np.full([len(encoded), width], tokenizer.pad_token_id, np.int32)
        mask = np.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, :len(e)] = e
            mask[row, :len(e)] = 1
        predicted = tf.argmax(model(input_ids=ids, attention_mask=mask).logits, -1).numpy()
        for row, (e, n) in enumerate(zip(encoded, word_len)):
            right = predicted[row, len(e) - 1 - n:len(e) - 1] == np.asarray(e[-n:])
            token_hits += bool(right[-1])
            word_hits += bool(right.all())
    return token_hits / len(texts), word_hits / len(texts), longest


def train(model, stream):
    schedule = tf.keras.optimizers.schedules.CosineDecay(
        0.0, max_steps - warmup_steps, alpha=min_lr_ratio, warmup_target=learning_rate,
        warmup_steps=warmup_steps)
    optimizer = tf.keras.optimizers.Adam(schedule, global_clipnorm=1.0)

    @tf.function(jit_compile=True)  # XLA: about 1.2x faster per step on CPU
    def step(x):
        with tf.GradientTape() as tape:
            logits = model(x[:, :-1], training=True).logits
            loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
                x[:, 1:], logits, from_logits=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(seed)
    losses = []
    bar = tqdm(range(max_steps), desc="training", unit="step")
    for i in bar:
        starts = rng.integers(0, len(stream) - seq_len - 1, batch_size)
        x = np.stack([stream[s:s + seq_len + 1] for s in starts])
        losses.append(float(step(tf.constant(x))))
        if i % 50 == 0 or i == max_steps - 1:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    return losses


def write_model_card(path, record):
    r, s = record, record["settings"]
    path.write_text(f"""# gptj-kjv: a small GPT-J trained on the King James Bible

The offline default model of this project: a `TFGPTJForCausalLM` small enough to bundle
({r['parameters'] / 1e6:.2f}M parameters, {r['tf_model_h5_bytes'] / 2**20:.1f} MiB fp32 `tf_model.h5`)
that still reads its context, so the INT8 pipeline can be checked for accuracy without the
hub. Not a useful language model; use `EleutherAI/gpt-j-6B` for the real run.

| | |
|---|---|
| architecture | GPT-J: {s['n_layer']} layers, width {s['n_embd']}, {s['n_head']} heads, rotary_dim {s['rotary_dim']}, MLP {s['n_inner']}, {s['n_positions']} positions, vocab {r['model_vocab_size']} |
| tokenizer | byte-level BPE, {r['tokenizer_size']} entries, `GPT2TokenizerFast`, eos = bos = unk = pad = `<|endoftext|>` |
| corpus | {r['corpus']['description']} ({r['corpus']['train_words']} words, {r['corpus']['train_tokens']} tokens) |
| training | {r['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens, Adam, peak lr {s['learning_rate']}, {s['warmup_steps']} warmup steps then cosine to {s['min_lr_ratio']}x, seed {s['seed']} |
| time | {r['wall_time_s'] / 60:.1f} min on one CPU thread |
| final train loss | {r['final_train_loss']:.3f} (mean of the last 100 steps) |
| evaluation | {r['evaluation']['passages']} passages of `data/kjv_lambada/evaluation.jsonl` (verses never trained on) |
| last-token accuracy (FP32) | {100 * r['evaluation']['last_token_accuracy']:.2f}% |
| last-word accuracy (FP32) | {100 * r['evaluation']['last_word_accuracy']:.2f}% |

The GPT-J tokenizer (50400 entries) is not used: at width 256 its two embedding matrices
alone would be 103 MB in fp32.

## Retrain

    python data/kjv_lambada/prepare.py   # needs `apt-get install bible-kjv bible-kjv-text`
    python models/train_gptj_kjv.py      # about {r['wall_time_s'] / 60:.0f} min on one thread

Both are deterministic: the same seeds give the same data, tokenizer and weights.
""")


def main():
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()

    data, out = Path(data_dir), Path(out_dir)
    text_file = data / "train.txt"
    if not text_file.exists():
        raise SystemExit(f"{text_file} is missing: run `python data/kjv_lambada/prepare.py` first")
    began = time.time()
    tokenizer = train_tokenizer(text_file, out)
    stream = tokenize_corpus(tokenizer, text_file)
    log.info("tokenizer: %d entries; corpus: %d tokens", len(tokenizer), len(stream))

    model = build_model(tokenizer)
    log.info("model: %d parameters", model.count_params())
    losses = train(model, stream)
    train_time = time.time() - began
    model.save_pretrained(str(out))

    texts = [json.loads(line)["text"] for line in open(data / "evaluation.jsonl")]
    token_acc, word_acc, longest = score_passages(model, tokenizer, texts, eval_batch)
    log.info("evaluation: last-token accuracy %.4f, last-word accuracy %.4f (%d passages, "
             "longest %d tokens)", token_acc, word_acc, len(texts), longest)

    settings = {k: globals()[k] for k in (
        "seed", "bpe_vocab", "n_embd", "n_layer", "n_head", "rotary_dim", "n_inner",
        "n_positions", "seq_len", "batch_size", "max_steps", "warmup_steps", "learning_rate",
        "min_lr_ratio")}
    record = {
        "corpus": {"description": "King James Bible (Debian bible-kjv) minus the evaluation "
                                  "passages' verses: data/kjv_lambada/train.txt",
                   "train_words": len(text_file.read_text().split()), "train_tokens": len(stream)},
        "settings": settings,
        "tokenizer_size": len(tokenizer),
        "model_vocab_size": model.config.vocab_size,
        "parameters": model.count_params(),
        "tf_model_h5_bytes": (out / "tf_model.h5").stat().st_size,
        "steps": len(losses),
        "wall_time_s": round(train_time, 1),
        "final_train_loss": float(np.mean(losses[-100:])),
        "loss_every_100_steps": [round(float(np.mean(losses[i:i + 100])), 4)
                                 for i in range(0, len(losses), 100)],
        "evaluation": {"file": "data/kjv_lambada/evaluation.jsonl", "passages": len(texts),
                       "longest_tokens": longest, "last_token_accuracy": token_acc,
                       "last_word_accuracy": word_acc},
        "versions": {"tensorflow": tf.__version__,
                     "transformers": __import__("transformers").__version__},
    }
    (out / "training_log.json").write_text(json.dumps(record, indent=2) + "\n")
    write_model_card(out / "README.md", record)
    log.info("saved model, tokenizer, training_log.json and README.md to %s", out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    knobs = ["data_dir", "out_dir", "seed", "bpe_vocab", "n_embd", "n_layer", "n_head",
             "rotary_dim", "n_inner", "n_positions", "seq_len", "batch_size", "max_steps",
             "warmup_steps", "learning_rate", "min_lr_ratio", "eval_batch"]
    for name in knobs:
        parser.add_argument("--" + name, type=type(globals()[name]), default=globals()[name])
    globals().update(vars(parser.parse_args()))
    main()
