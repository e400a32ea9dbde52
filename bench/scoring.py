"""run_benchmark.py's scoring as an Apache Beam pipeline, against the same scoring in this process.

    python bench/scoring.py                          # the bundled model and GPT-J-6B's width, 1 layer
    python bench/scoring.py --models bundled-gptj-kjv --passages 500

For each FP32/INT8 pair, on the bundled evaluation text: both models scored (each passage's
last-token logits and hits, batches by length) three ways, in turn, in one run:
- in this process: load a model, benchmark.score_batch on every batch, the next model (what
  run_benchmark.py did before its pipeline);
- the pipeline on Beam's local runner in this process (run_benchmark.py's default), records written;
- the same with two worker processes (--direct_running_mode=multi_processing --direct_num_workers=2).
Each time includes loading the models (and, for the worker processes, starting them); the ways run
in turn, --rounds times, and the fastest of each counts. Then the figures run_benchmark.py prints,
from each way's scores: they must be equal to the last digit.
"""
import argparse
import shutil
import time

import numpy as np

import common

MODELS = {"bundled-gptj-kjv": None, "gptj-6b-width-1l": 1}
TWO_WORKERS = ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def figures(fp32, int8):
    """run_benchmark.py's figures from two models' (last logits, token hits, word hits)."""
    from gptj_int8 import benchmark
    pair = benchmark.paired_logit_figures(fp32[0], int8[0])
    return {"FP32 accuracy": fp32[1].mean(), "INT8 accuracy": int8[1].mean(),
            "FP32 last-word accuracy": fp32[2].mean(), "INT8 last-word accuracy": int8[2].mean(),
            "agreement": pair["agreement"], "logit cosine": pair["logit_cosine"], "KL": pair["kl_divergence"]}


def in_process(model_dir, batches):
    from gptj_int8 import benchmark, savedmodel
    _, fn = savedmodel.load_serving_function(model_dir)
    parts = [benchmark.score_batch(fn, batch) for _, batch in batches]
    order = np.argsort(np.concatenate([indices for indices, _ in batches]))
    return tuple(np.concatenate(p)[order] for p in zip(*parts))


def through_pipeline(dirs, batches, vocab, beam_args, out):
    from gptj_int8 import scoring
    shutil.rmtree(out, ignore_errors=True)
    jobs = []
    for name, model_dir in dirs.items():
        records = scoring.ScoreRecords(out, name, name, vocab)
        records.open({"model": str(model_dir)}, batches)
        jobs.append((records, model_dir, batches))
    scoring.score(jobs, scoring.pipeline_options(beam_args))
    return {name: records.read(batches) for name, (records, _, _) in zip(dirs, jobs)}


def bench(name, n_layer, passages, batch_size, rounds):
    from gptj_int8 import data, evaluation, models
    fp32_dir = common.prepare(name, n_layer)
    dirs = {"FP32": fp32_dir, "INT8": common.converted(name)}
    tok = models.load_tokenizer(fp32_dir)
    sequences = data.encode_passages(tok, data.load_passages(data.EVALUATION_SET, passages),
                                     models.context_length(fp32_dir))
    batches = data.batches_by_length(sequences, batch_size, tok.pad_token_id)
    vocab = evaluation.vocab_size(fp32_dir)

    def score(beam_args):
        if beam_args is None:
            return {k: in_process(d, batches) for k, d in dirs.items()}
        rows = through_pipeline(dirs, batches, vocab, beam_args, common.RUNS / f"scoring-{name}")
        return {k: (r["logits"], r["token_hit"], r["word_hit"]) for k, r in rows.items()}

    ways = {"in this process": None, "pipeline, 1 worker (in this process)": [],
            "pipeline, 2 worker processes": TWO_WORKERS}
    seconds, scores = {way: [] for way in ways}, {}
    for _ in range(rounds):                 # the ways in turn, so that a noisy machine slows each alike
        for way, beam_args in ways.items():
            start = time.perf_counter()
            scores[way] = score(beam_args)
            seconds[way].append(time.perf_counter() - start)
    seconds = {way: min(s) for way, s in seconds.items()}

    n = 2 * len(sequences)
    base = seconds["in this process"]
    print(f"\n{name}: {len(sequences)} passages x FP32 and INT8, batch {batch_size}, the fastest of {rounds} rounds, "
          f"on {common.cpu_name()}")
    print("| way | seconds | passages/s | time / in this process |")
    print("|---|---|---|---|")
    for way, s in seconds.items():
        print(f"| {way} | {s:.1f} | {n / s:.2f} | {s / base:.3f}x |")
    table = {way: figures(s["FP32"], s["INT8"]) for way, s in scores.items()}
    print("\n| figure | " + " | ".join(table) + " | equal |")
    print("|---|" + "---|" * len(table) + "---|")
    for key in table["in this process"]:
        values = [t[key] for t in table.values()]
        print(f"| {key} | " + " | ".join(f"{v:.6f}" for v in values) + f" | {'yes' if len(set(values)) == 1 else 'NO'} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--passages", type=int, nargs="+", default=[500, 40],
                   help="passages per model, in --models' order")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="times each way is run, in turn; the fastest counts")
    args = p.parse_args()
    for name, passages in zip(args.models, args.passages):
        bench(name, MODELS[name], passages, args.batch_size, args.rounds)


if __name__ == "__main__":
    main()
