"""run_benchmark.py's evaluation of an FP32 and an INT8 SavedModel: scored passage by passage into
records on disk, so that an interrupted run resumes; timed; made to generate. Both models are loaded
together, their calls interleaved, when memory holds both; one at a time when it holds only one.

Scores: <output_dir>/scores/<original|converted>.bin, one fixed-size record per passage (its
last-token hit, its last-word hit, the logits that predict its last token), appended batch by batch
and flushed to disk; beside each, a .json fingerprint of what made them (the model's files, the
dataset and its passages, --num_samples, --batch_size, the context length). The same command after
an interruption (Ctrl-C, kill, even SIGKILL: a torn record is cut) keeps the records and scores the
rest; a changed model, dataset or flag, or --fresh, scores afresh. Every accuracy and agreement
figure is computed from the records, whichever way the run went, so a resumed or one-at-a-time
run gives an uninterrupted interleaved run's figures exactly. Timings are always measured anew.
"""
import dataclasses
import gc
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import benchmark, data, generation, memory, savedmodel
from .cli import UserError

log = logging.getLogger(__name__)

MODELS = {"original": "FP32", "converted": "INT8"}      # results.json's key -> the name printed
RECORDS_FORMAT = 1                                      # bumped when a record's layout changes


@dataclasses.dataclass
class Settings:
    """run_benchmark.py's flags."""
    dataset: str
    num_samples: int
    batch_size: int
    warmup: int
    iterations: int
    gen_samples: int
    max_new_tokens: int
    max_memory_gb: float = None
    fresh: bool = False


# ---------------------------------------------------------------- the records of scored passages

def record_dtype(vocab):
    return np.dtype([("token_hit", "?"), ("word_hit", "?"), ("logits", "<f4", (vocab,))])


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(model_dir):
    """Hashes of a SavedModel's graph and of its variables' index (which holds every tensor's checksum)."""
    model_dir = Path(model_dir)
    files = [model_dir / "saved_model.pb", model_dir / "variables" / "variables.index"]
    return {f.relative_to(model_dir).as_posix(): _sha256(f) for f in files if f.exists()}


def fingerprint(model_dir, settings, sequences, context_length, vocab):
    """What a model's records depend on: a change of any of it scores the model afresh."""
    dataset = Path(settings.dataset)
    passages = hashlib.sha256(json.dumps(sequences).encode()).hexdigest()
    return {"format": RECORDS_FORMAT, "model": model_identity(model_dir),
            "dataset": str(dataset.resolve()) if dataset.exists() else settings.dataset,
            "num_samples": settings.num_samples, "batch_size": settings.batch_size,
            "context_length": context_length, "vocab": vocab, "passages": passages}


def _changes(old, new):
    """Why records made under `old` do not serve `new`, in words."""
    said = {"model": "the model changed", "passages": "the passages changed (dataset file or tokenizer)",
            "format": "the records' format changed"}
    changed = [k for k in new if old.get(k) != new[k]]
    if changed != ["passages"]:                     # a changed flag or dataset explains changed passages
        changed = [k for k in changed if k != "passages"]
    return ", ".join(said.get(k, f"{k} changed ({old.get(k)} -> {new[k]})") for k in changed)


class ScoreRecords:
    """One model's scored passages on disk: `<folder>/<name>.bin`, appended a batch at a time, and
    `<folder>/<name>.json`, the fingerprint of what made them (written atomically)."""

    def __init__(self, folder, name, label, vocab):
        self.path = Path(folder) / f"{name}.bin"
        self.fingerprint_path = Path(folder) / f"{name}.json"
        self.label = label
        self.dtype = record_dtype(vocab)

    @property
    def count(self):
        return self.path.stat().st_size // self.dtype.itemsize if self.path.exists() else 0

    def open(self, fingerprint, batch_sizes, fresh=False):
        """Keep the records made under the same fingerprint up to the last whole batch (cutting a
        torn record or a part-written batch), or start afresh (saying why). Returns how many are kept."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            stored = json.loads(self.fingerprint_path.read_text()) if self.fingerprint_path.exists() else None
        except (OSError, json.JSONDecodeError):
            stored = "unreadable"
        if fresh:
            why = "--fresh"
        elif stored == fingerprint:
            why = None
        elif stored is None:
            why = "no fingerprint beside its records" if self.path.exists() else ""   # "": a first run
        elif stored == "unreadable":
            why = "its fingerprint is unreadable"
        else:
            why = _changes(stored, fingerprint)
        if why is not None:
            if why:
                log.info("%s: scoring afresh: %s", self.label, why)
            self.path.unlink(missing_ok=True)
            tmp = self.fingerprint_path.with_name(self.fingerprint_path.name + ".tmp")
            tmp.write_text(json.dumps(fingerprint, indent=1))
            os.replace(tmp, self.fingerprint_path)
            self.path.touch()
            return 0
        size, total = self.path.stat().st_size if self.path.exists() else 0, sum(batch_sizes)
        ends = np.cumsum([0, *batch_sizes])
        keep = int(ends[ends <= size // self.dtype.itemsize][-1])
        if keep * self.dtype.itemsize != size:
            log.info("%s: cut %d bytes after the last whole batch (a torn record, or a batch cut short) from %s",
                     self.label, size - keep * self.dtype.itemsize, self.path)
            os.truncate(self.path, keep * self.dtype.itemsize)
        if keep == total:
            log.info("%s: all %d passages scored already (%s): scoring skipped", self.label, total, self.path)
        elif keep:
            log.info("%s: resuming at passage %d of %d (%d scored in %s)", self.label, keep + 1, total, keep,
                     self.path)
        return keep

    def append(self, last_logits, token_hits, word_hits):
        """One scored batch, on disk before this returns."""
        rows = np.zeros(len(token_hits), self.dtype)
        rows["token_hit"], rows["word_hit"], rows["logits"] = token_hits, word_hits, last_logits
        with open(self.path, "ab") as f:
            f.write(rows.tobytes())
            f.flush()
            os.fsync(f.fileno())

    def read(self):
        """Every record, memory-mapped: [passages] of record_dtype."""
        return np.memmap(self.path, self.dtype, mode="r")


def score(fn, batches, records):
    """Score the batches whose passages are not yet in `records` (ScoreRecords, opened), appending
    each batch's records as it is scored."""
    sizes = [len(b[0]) for b in batches]
    done, total = records.count, sum(sizes)
    if done == total:
        return
    first = int(np.searchsorted(np.cumsum([0, *sizes]), done))
    bar = tqdm(total=total, initial=done, unit="passage", desc=f"{records.label} scoring", postfix=f"{total - done} left",
               bar_format="{desc}: {n_fmt}/{total_fmt} passages{postfix} [{elapsed}<{remaining}, {rate_fmt}]")
    try:
        for batch in batches[first:]:
            records.append(*benchmark.score_batch(fn, batch))
            bar.set_postfix_str(f"{total - bar.n - len(batch[0])} left", refresh=False)
            bar.update(len(batch[0]))
    except KeyboardInterrupt:
        log.info("%s: interrupted after %d of %d passages, kept in %s: the same command continues from there",
                 records.label, records.count, total, records.path)
        raise
    finally:
        bar.close()


# ---------------------------------------------------------------- the run

def vocab_size(model_dir, signatures=None):
    """The vocabulary size: the serving signature's static logits width, else config.json's."""
    signatures = signatures or savedmodel.read_signature_defs(model_dir)
    dims = signatures[generation.SERVING].outputs[savedmodel.OUTPUT].tensor_shape.dim
    if dims and dims[-1].size > 0:
        return dims[-1].size
    config = Path(model_dir) / "config.json"
    if config.is_file() and json.loads(config.read_text()).get("vocab_size"):
        return int(json.loads(config.read_text())["vocab_size"])
    raise UserError(f"cannot tell the vocabulary size of {model_dir}: no static logits width, no config.json")


def run_phases(batches, vocab, generating):
    """The phases of a run, as memory.needs takes them: scoring and timing (serving_default, and
    a batch's logits), then generation (prefill and decode) when it runs."""
    phases = [((generation.SERVING,), memory.logits_bytes(max(b[0].size for b in batches), vocab))]
    return phases + [(generation.STEPS, 0)] if generating else phases


def _scoring_phase(names, paths, batches, records, settings):
    """Load the models, score what their records lack, and time them (interleaved call by call when
    there are two): {name: seconds per call}."""
    loaded = {name: savedmodel.load_serving_function(paths[name]) for name in names}
    for name, (_, fn) in loaded.items():
        score(fn, batches, records[name])
    seconds = benchmark.time_models([fn for _, fn in loaded.values()], batches, settings.warmup, settings.iterations)
    return dict(zip(names, seconds))


def _generation_phase(names, paths, prompts, max_new_tokens, reference=None):
    """Load the models afresh and generate (benchmark.generate_greedily's (figures, tokens))."""
    loaded = [savedmodel.load_serving_function(paths[name])[0] for name in names]
    steps = [(m.signatures[generation.PREFILL], m.signatures[generation.DECODE]) for m in loaded]
    return benchmark.generate_greedily(steps, prompts, max_new_tokens, reference=reference)


def evaluate_pair(paths, sequences, pad_id, context_length, output_dir, settings):
    """results.json's figures for the models `paths` ({"original": FP32 dir, "converted": INT8 dir})
    on the encoded passages `sequences`, with the scores recorded under `output_dir`/scores.

    Memory is planned before a model is loaded (memory.plan): both models together when they fit,
    their calls interleaved so that a noisy machine slows both alike; else one at a time (FP32
    scored, timed and generating, freed, then INT8), with timings then taken apart; else a one-line
    refusal. Each phase loads its models afresh and frees them after: the int8 kernels cache a
    reordered copy of their weights per signature that runs them, and a model that has run
    serving_default would hold that copy through prefill and decode (measured on GPT-J-6B's width,
    1 layer: 0.44 GB, given back when the model is freed), so scoring and generation each need only
    their own signatures' memory."""
    batches = data.batches(sequences, settings.batch_size, pad_id)
    signatures = {name: savedmodel.read_signature_defs(path) for name, path in paths.items()}
    vocab = {name: vocab_size(paths[name], sigs) for name, sigs in signatures.items()}
    prompts = []
    if settings.gen_samples:
        missing = [name for name, sigs in signatures.items() if not generation.has_generation(sigs)]
        if missing:
            log.info("no generation benchmark: the %s model has no generation signatures "
                     "(re-export it with prepare_model.py)", " and ".join(missing))
        else:
            room = context_length - settings.max_new_tokens
            prompts = [ids[:-n][-room:] for ids, n in sequences[:settings.gen_samples]]
    plan = memory.plan({MODELS[name]: path for name, path in paths.items()},
                       run_phases(batches, max(vocab.values()), bool(prompts)), settings.max_memory_gb)

    records = {name: ScoreRecords(Path(output_dir) / "scores", name, MODELS[name], vocab[name]) for name in paths}
    for name, r in records.items():
        r.open(fingerprint(paths[name], settings, sequences, context_length, vocab[name]),
               [len(b[0]) for b in batches], settings.fresh)
    seconds, generated, reference = {}, {}, None
    for names in ([list(paths)] if plan.timing == memory.INTERLEAVED else [[name] for name in paths]):
        seconds.update(_scoring_phase(names, paths, batches, records, settings))
        gc.collect()
        if prompts:
            figures, tokens = _generation_phase(names, paths, prompts, settings.max_new_tokens, reference)
            gc.collect()
            generated.update(zip(names, figures))
            reference = tokens[0] if reference is None else reference

    results = figures_from_records(records, seconds, settings.batch_size)
    if prompts:
        for name in paths:
            results[name].update({k: v for k, v in generated[name].items()
                                  if k not in ("teacher_forced_agreement", "common_prefix")})
        int8, fp32 = generated["converted"], generated["original"]
        results.update({"generation_prompts": len(prompts), "max_new_tokens": settings.max_new_tokens,
                        "teacher_forced_agreement": int8["teacher_forced_agreement"],
                        "common_prefix": int8["common_prefix"],
                        "next_token_speedup": (fp32["next_token_ms"] / int8["next_token_ms"]
                                               if int8["next_token_ms"] else None)})
    results["size_mb"] = {name: savedmodel.saved_model_size(path) / 1e6 for name, path in paths.items()}
    results["timing"] = plan.timing
    results["memory"] = plan.summary()
    return results


def figures_from_records(records, seconds, batch_size):
    """Each model's accuracy (with 95% intervals) and latency, and the pair's agreement, logit cosine,
    KL divergence and McNemar p-value, from the records on disk."""
    results = {}
    read = {name: r.read() for name, r in records.items()}
    for name, rows in read.items():
        token_hits, word_hits = np.asarray(rows["token_hit"]), np.asarray(rows["word_hit"])
        latency, n = float(np.mean(seconds[name])), len(rows)
        results[name] = {"accuracy": float(token_hits.mean()),
                         "accuracy_ci95": benchmark.wilson_interval(int(token_hits.sum()), n),
                         "last_word_accuracy": float(word_hits.mean()),
                         "last_word_accuracy_ci95": benchmark.wilson_interval(int(word_hits.sum()), n),
                         "num_samples": n,
                         "latency_ms": latency * 1000, "throughput": batch_size / latency}
    a, b = read["original"], read["converted"]
    results.update(benchmark.paired_logit_figures(a["logits"], b["logits"]))
    results["accuracy_diff_pvalue"] = benchmark.mcnemar_pvalue(np.asarray(a["token_hit"]), np.asarray(b["token_hit"]))
    results["speedup"] = results["original"]["latency_ms"] / results["converted"]["latency_ms"]
    return results
