"""Accuracy, latency and throughput of the FP32 and the INT8 SavedModel, side by side.

    python run_benchmark.py --output_dir=./output

Accuracy is the original example's metric: the argmax of the logits at the position before a
passage's last token equals that token. LAMBADA's last-word accuracy (every token of the last
word predicted greedily), 95% confidence intervals, the agreement and KL divergence of the two
models and a paired test of their accuracy difference are printed after the blocks.
The two models are timed call by call in turn, on CPU.
Writes <output_dir>/results.json and <output_dir>/results.png.
"""
import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np

from gptj_int8 import benchmark, cli, data, models, savedmodel

log = logging.getLogger("run_benchmark")
DEFAULT_MODEL = models.default_export_dir(models.BUNDLED_MODEL)


def print_block(title, batch_size, result):
    print(f"The infrence results of {title} with TF2.x API")
    print(f"Batch size = {batch_size}")
    print(f"Accuracy: {result['accuracy'] * 100:.3f}%")
    print(f"Latency: {result['latency_ms']:.3f} ms")
    print(f"Throughput: {result['throughput']:.3f} samples/sec")


def write_chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["original", "converted"]
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    for ax, key, label in ((axes[0], "accuracy", "accuracy (%)"), (axes[1], "latency_ms", "latency (ms)")):
        values = [results[n][key] * (100 if key == "accuracy" else 1) for n in names]
        ax.bar(["FP32", "INT8"], values, color=["#888888", "#1f77b4"])
        ax.set_title(label)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_model", default=str(DEFAULT_MODEL), help="the FP32 SavedModel")
    p.add_argument("--converted_model", default=None, help="the INT8 SavedModel (default ./converted_<name>)")
    p.add_argument("--output_dir", default="./output")
    p.add_argument("--dataset", default=str(data.EVALUATION_SET),
                   help="JSONL with a 'text' field, or a hub id such as EleutherAI/lambada_openai")
    p.add_argument("--num_samples", type=cli.positive_int, default=None, help="passages to score (default all)")
    p.add_argument("--batch_size", type=cli.positive_int, default=1)
    p.add_argument("--warmup", type=cli.non_negative_int, default=5)
    p.add_argument("--iterations", type=cli.positive_int, default=50, help="timed calls per model")
    args = p.parse_args()

    input_model = Path(args.input_model)
    converted = Path(args.converted_model or models.default_converted_dir(input_model))
    for path in (input_model, converted):
        savedmodel.check_saved_model_dir(path)
    _, original_fn = savedmodel.load_serving_function(input_model)
    _, converted_fn = savedmodel.load_serving_function(converted)
    tokenizer = models.load_tokenizer(input_model)
    max_length = models.context_length(input_model)
    sequences = data.encode_passages(tokenizer, data.load_passages(args.dataset, args.num_samples), max_length)
    batches = data.batches(sequences, args.batch_size, tokenizer.pad_token_id)

    logits_a, token_a, word_a = benchmark.evaluate(original_fn, batches, "FP32")
    logits_b, token_b, word_b = benchmark.evaluate(converted_fn, batches, "INT8")
    seconds = benchmark.time_models([original_fn, converted_fn], batches, args.warmup, args.iterations)

    results = {}
    for name, token_hits, word_hits, secs in (("original", token_a, word_a, seconds[0]),
                                              ("converted", token_b, word_b, seconds[1])):
        latency = float(np.mean(secs))
        n = len(token_hits)
        results[name] = {"accuracy": float(token_hits.mean()),
                         "accuracy_ci95": benchmark.wilson_interval(int(token_hits.sum()), n),
                         "last_word_accuracy": float(word_hits.mean()),
                         "last_word_accuracy_ci95": benchmark.wilson_interval(int(word_hits.sum()), n),
                         "num_samples": n,
                         "latency_ms": latency * 1000, "throughput": args.batch_size / latency}
    results["agreement"] = benchmark.argmax_agreement(logits_a, logits_b)
    results["logit_cosine"] = benchmark.logit_cosine(logits_a, logits_b)
    results["kl_divergence"] = benchmark.mean_kl_divergence(logits_a, logits_b)
    results["accuracy_diff_pvalue"] = benchmark.mcnemar_pvalue(token_a, token_b)
    results["speedup"] = results["original"]["latency_ms"] / results["converted"]["latency_ms"]
    results["size_mb"] = {"original": savedmodel.saved_model_size(input_model) / 1e6,
                          "converted": savedmodel.saved_model_size(converted) / 1e6}

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out / "results.json")
    write_chart(results, out / "results.png")

    print_block("original gpt-j", args.batch_size, results["original"])
    print()
    print_block("converted gpt-j", args.batch_size, results["converted"])
    print()
    for name in ("original", "converted"):
        r = results[name]
        print(f"{name:>9}: last-token accuracy {r['accuracy'] * 100:.2f}% "
              f"(95% CI {r['accuracy_ci95'][0] * 100:.2f}-{r['accuracy_ci95'][1] * 100:.2f}), "
              f"last-word accuracy {r['last_word_accuracy'] * 100:.2f}% "
              f"(95% CI {r['last_word_accuracy_ci95'][0] * 100:.2f}-{r['last_word_accuracy_ci95'][1] * 100:.2f}), "
              f"n={r['num_samples']}")
    print(f"INT8 vs FP32: agreement {results['agreement'] * 100:.2f}%, logit cosine {results['logit_cosine']:.5f}, "
          f"KL {results['kl_divergence']:.5f} nats, accuracy difference p={results['accuracy_diff_pvalue']:.3f} "
          f"(McNemar), speed-up {results['speedup']:.2f}x, "
          f"size {results['size_mb']['converted']:.1f} MB vs {results['size_mb']['original']:.1f} MB")


if __name__ == "__main__":
    cli.run(main)
