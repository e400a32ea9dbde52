"""Accuracy, latency and throughput of the FP32 and the INT8 SavedModel, side by side.

    python run_benchmark.py --output_dir=./output

Accuracy is the original example's metric: the argmax of the logits at the position before a
passage's last token equals that token. LAMBADA's last-word accuracy (every token of the last
word predicted greedily), 95% confidence intervals, the agreement and KL divergence of the two
models and a paired test of their accuracy difference are printed after the blocks.
The two models are timed call by call in turn, on CPU, when memory holds both; when it holds only
one (what the OS reports available, the cgroup's limit, --max_memory_gb), they are scored, timed and
made to generate one at a time, with the same accuracy figures; when it cannot hold one alone, the
run is refused before loading. The output says which way it timed.

Scoring is an Apache Beam pipeline (RunInference on serving_default), run on this machine by default
and on Dataflow, Flink or Spark by Beam's own flags: every flag this script does not know goes to
Beam's PipelineOptions (--runner, --direct_num_workers, --direct_running_mode=multi_processing,
--temp_location, ...). Each scored batch is recorded as it finishes, under <output_dir>/scores/ (a
local path, or gs://, s3://, hdfs:// for a cluster): the same command after an interruption (Ctrl-C,
kill, a lost worker) continues where it stopped, with the figures of an uninterrupted run (timings
are measured anew, here). A changed model, dataset or flag that scoring depends on scores afresh, as
does --fresh.

When both models have the generation signatures, each also continues --gen_samples prompts (the
context before a passage's last word) by --max_new_tokens greedy tokens, the two in turn prompt
by prompt: time to the first token, time of each further token, tokens per second, and how often
INT8 picks FP32's token when both continue FP32's text (teacher-forced agreement).
Writes <output_dir>/results.json and <output_dir>/results.png.
"""
import argparse
import io
import json
from pathlib import Path

from gptj_int8 import benchmark, cli, data, evaluation, memory, models, savedmodel, scoring

DEFAULT_MODEL = models.default_export_dir(models.BUNDLED_MODEL)


def print_block(title, batch_size, result):
    print(f"The infrence results of {title} with TF2.x API")
    print(f"Batch size = {batch_size}")
    print(f"Accuracy: {result['accuracy'] * 100:.3f}%")
    print(f"Latency: {result['latency_ms']:.3f} ms")
    print(f"Throughput: {result['throughput']:.3f} samples/sec")


def chart_png(results):
    """The bars of accuracy, latency and generation speed, FP32 beside INT8, as PNG bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = ["original", "converted"]
    panels = [("accuracy", "accuracy (%)", 100), ("latency_ms", "latency (ms)", 1)]
    if "tokens_per_s" in results["original"]:
        panels.append(("tokens_per_s", "generation (tokens/s)", 1))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (key, label, factor) in zip(axes, panels):
        values = [results[n][key] * factor for n in names]
        ax.bar(["FP32", "INT8"], values, color=["#888888", "#1f77b4"])
        ax.set_title(label)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    return png.getvalue()


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
    p.add_argument("--gen_samples", type=cli.non_negative_int, default=50,
                   help="prompts to continue with generation (0: no generation benchmark)")
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=32, help="greedy tokens per prompt")
    p.add_argument("--max_memory_gb", type=cli.positive_float, default=None,
                   help="memory this run may use (default: what the OS reports available): both models together "
                        "when they fit, else one at a time, else refused")
    p.add_argument("--fresh", action="store_true", help="score every passage again, even if <output_dir>/scores holds them")
    p.add_argument("--model_copies", type=cli.positive_int, default=None,
                   help="score with this many copies of a model per machine, shared by its worker processes "
                        "(Beam's large-model mode; default: one per worker process)")
    args, beam_args = p.parse_known_args()
    beam_options = scoring.pipeline_options(beam_args)

    input_model = Path(args.input_model)
    converted = Path(args.converted_model or models.default_converted_dir(input_model))
    for path in (input_model, converted):
        savedmodel.check_saved_model_dir(path)
    tokenizer = models.load_tokenizer(input_model)
    max_length = models.context_length(input_model)
    sequences = data.encode_passages(tokenizer, data.load_passages(args.dataset, args.num_samples), max_length)
    settings = evaluation.Settings(args.dataset, args.num_samples, args.batch_size, args.warmup, args.iterations,
                                   args.gen_samples, args.max_new_tokens, args.max_memory_gb, args.fresh,
                                   beam_options, args.model_copies)
    results = evaluation.evaluate_pair({"original": input_model, "converted": converted}, sequences,
                                       tokenizer.pad_token_id, max_length, args.output_dir, settings)
    generated = "generation_prompts" in results

    scoring.write_file(scoring.join(args.output_dir, "results.json"), json.dumps(results, indent=2).encode())
    scoring.write_file(scoring.join(args.output_dir, "results.png"), chart_png(results))

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
          f"(McNemar), {benchmark.faster_or_slower(results['speedup'])}, "
          f"size {results['size_mb']['converted']:.1f} MB vs {results['size_mb']['original']:.1f} MB")
    together, available = (memory.gb(results["memory"][k] * 1e9) for k in ("together_gb", "available_gb"))
    if results["timing"] == memory.INTERLEAVED:
        print(f"timing: interleaved, FP32 and INT8 call by call in turn (together they need {together} GB "
              f"of {available} GB available)")
    else:
        print(f"timing: one at a time, FP32 then INT8 (together they would need {together} GB, {available} GB "
              f"available: {results['memory']['limit']})")
    if generated:
        print(f"generation, {results['generation_prompts']} prompts x {results['max_new_tokens']} greedy tokens, batch 1:")
        for name in ("original", "converted"):
            r = results[name]
            print(f"{name:>9}: first token {r['first_token_ms']:.1f} ms, next token {r['next_token_ms']:.2f} ms, "
                  f"{r['tokens_per_s']:.1f} tokens/s")
        print(f"INT8 vs FP32: next token {benchmark.faster_or_slower(results['next_token_speedup'])}, teacher-forced agreement "
              f"{results['teacher_forced_agreement'] * 100:.2f}%, common prefix {results['common_prefix']:.1f} "
              f"of {results['max_new_tokens']} tokens")


if __name__ == "__main__":
    cli.run(main)
