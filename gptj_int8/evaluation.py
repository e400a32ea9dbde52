"""run_benchmark.py's evaluation of an FP32 and an INT8 SavedModel: scored by an Apache Beam
pipeline into records on storage, so that an interrupted run resumes (scoring.py); timed; made to
generate. Timing and generation run in this process: both models loaded together, their calls
interleaved, when memory holds both; one at a time when it holds only one.

Every accuracy and agreement figure is computed from the records, whichever way the run went (any
runner, any number of workers, resumed or not, one model at a time or both), so every way gives an
uninterrupted run's figures exactly. Timings are always measured anew.
"""
import dataclasses
import gc
import json
import logging
from pathlib import Path

import numpy as np

from . import benchmark, data, generation, memory, savedmodel, scoring
from .cli import UserError

log = logging.getLogger(__name__)

MODELS = {"original": "FP32", "converted": "INT8"}      # results.json's key -> the name printed


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
    beam_options: object = None         # apache_beam's PipelineOptions (scoring.pipeline_options)
    model_copies: int = None


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


def scoring_groups(groups, paths, phase, settings):
    """The models each scoring pipeline loads, in order: `groups` (the timing plan's: both together,
    or one at a time) where the pipeline's workers can hold them, else one model per pipeline; on a
    runner elsewhere always one, so that no worker holds both. UserError, before anything is loaded,
    when the local workers cannot hold one model each."""
    processes = scoring.local_processes(settings.beam_options)
    if processes is None:
        return [[name] for names in groups for name in names]
    have, source = memory.memory_limit(settings.max_memory_gb)
    signatures, extra = phase

    def need(names):
        return memory.scoring_need([paths[n] for n in names], signatures, extra, processes, settings.model_copies)
    out = []
    for names in groups:
        if len(names) > 1 and need(names) <= have:
            out.append(names)
            continue
        for name in names:
            if need([name]) > have:
                holders = (f"{settings.model_copies} shared copies of" if settings.model_copies else
                           f"{processes} worker processes, each holding" if processes else "")
                raise UserError(f"scoring with {holders} the {MODELS[name]} model needs {memory.gb(need([name]))} GB "
                                f"and {memory.gb(have)} GB is available ({source}): use fewer --direct_num_workers, "
                                "or --model_copies 1")
            out.append([name])
    return out


def _timing_phase(names, paths, batches, settings):
    """Load the models and time them (interleaved call by call when there are two): {name: seconds per call}."""
    loaded = {name: savedmodel.load_serving_function(paths[name]) for name in names}
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
    their calls interleaved so that a noisy machine slows both alike; else one at a time, with
    timings then taken apart; else a one-line refusal. The scoring pipelines follow the same plan,
    per local worker process (scoring_groups). Each phase (scoring, timing, generation) loads its
    models afresh and frees them after: the int8 kernels cache a reordered copy of their weights per
    signature that runs them, and a model that has run serving_default would hold that copy through
    prefill and decode (measured on GPT-J-6B's width, 1 layer: 0.44 GB, given back when the model is
    freed), so each phase needs only its own signatures' memory."""
    batches = data.batches(sequences, settings.batch_size, pad_id)            # timed in passage order
    scored = data.batches_by_length(sequences, settings.batch_size, pad_id)
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
    phases = run_phases(batches, max(vocab.values()), bool(prompts))
    plan = memory.plan({MODELS[name]: path for name, path in paths.items()}, phases, settings.max_memory_gb)
    groups = [list(paths)] if plan.timing == memory.INTERLEAVED else [[name] for name in paths]
    pipelines = scoring_groups(groups, paths, phases[0], settings)

    records = {name: scoring.ScoreRecords(scoring.join(output_dir, "scores"), name, MODELS[name], vocab[name])
               for name in paths}
    for name, r in records.items():
        r.open(scoring.fingerprint(paths[name], settings, sequences, context_length, vocab[name]), scored,
               settings.fresh)
    for names in pipelines:
        scoring.score([(records[name], paths[name], scored) for name in names], settings.beam_options,
                      settings.model_copies)
    seconds, generated, reference = {}, {}, None
    for names in groups:
        seconds.update(_timing_phase(names, paths, batches, settings))
        gc.collect()
        if prompts:
            figures, tokens = _generation_phase(names, paths, prompts, settings.max_new_tokens, reference)
            gc.collect()
            generated.update(zip(names, figures))
            reference = tokens[0] if reference is None else reference

    results = figures_from_records({name: r.read(scored) for name, r in records.items()}, seconds,
                                   settings.batch_size)
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


def figures_from_records(read, seconds, batch_size):
    """Each model's accuracy (with 95% intervals) and latency, and the pair's agreement, logit cosine,
    KL divergence and McNemar p-value, from each model's records ({name: ScoreRecords.read's})."""
    results = {}
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
