"""Which quantization settings are worth it: the bundled model through the flag combinations.

    python bench/accuracy.py         # models are built once under bench/runs/

For each setting: quantize.py converts the bundled model; the whole bundled evaluation set is
scored (last-token accuracy, the original example's metric, and last-word accuracy), against
FP32: the accuracy drop, argmax agreement, mean KL divergence of the next-token distributions,
McNemar's p-value, the INT8/FP32 speed ratio (batch 1, the two timed in turn), the INT8 model's
size, and the peak RSS (polled, the process and its children) and wall time of its quantize.py run.
The `INC ...` rows run Intel Neural Compressor 3.10 (quantize.py --engine inc) on the same passages.
"""
import argparse
import json
import shutil

import common
from common import RUNS

SETTINGS = [
    ("default (fused int8, per-channel)", []),
    ("per-tensor weights", ["--no-per_channel"]),
    ("SmoothQuant alpha 0.5", ["--smooth_quant", "--sq_alpha", "0.5"]),
    ("performance_only", ["--performance_only"]),
    ("itex_mode (QDQ, fake quant on stock TF)", ["--itex_mode"]),
    ("fallback, max drop 0.5", ["--max_accuracy_drop", "0.5"]),
    ("itex_mode + performance_only", ["--itex_mode", "--performance_only"]),
    ("INC default (per-tensor weights)", ["--engine", "inc"]),
    ("INC SmoothQuant alpha 0.5", ["--engine", "inc", "--smooth_quant", "--sq_alpha", "0.5"]),
]


def convert(fp32_dir, out, output_dir, flags, label):
    """Run quantize.py; {"peak_rss_gb", "seconds"} of the run, also kept in output_dir/conversion.json
    so that a later run reusing the model still reports them."""
    peak, seconds = common.script_peak("quantize.py", "--input_model", fp32_dir, "--converted_model", out,
                                       "--output_dir", output_dir, *flags)
    measured = {"peak_rss_gb": peak, "seconds": seconds}
    (output_dir / "conversion.json").write_text(json.dumps(measured))
    return measured


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=8, help="batch of the accuracy runs")
    p.add_argument("--iterations", type=int, default=40, help="timed calls per model, batch 1")
    p.add_argument("--fresh", action="store_true", help="convert again even if a model exists")
    args = p.parse_args()
    from gptj_int8 import benchmark, data, models, savedmodel

    fp32_dir = common.prepare("bundled-gptj-kjv")
    tok = models.load_tokenizer(fp32_dir)
    encoded = data.encode_passages(tok, data.load_passages(data.EVALUATION_SET), models.context_length(fp32_dir))
    batches = data.batches(encoded, args.batch_size, tok.pad_token_id)
    timing = data.batches(encoded[:args.iterations], 1, tok.pad_token_id)
    common.check_memory(fp32_dir, signatures=["serving_default"])
    fp32_obj, fp32 = savedmodel.load_serving_function(fp32_dir)
    logits_a, token_a, word_a = benchmark.evaluate(fp32, batches, "FP32")

    rows = []
    for i, (label, flags) in enumerate(SETTINGS):
        out = RUNS / f"converted_bundled_setting{i}"
        if args.fresh:
            shutil.rmtree(out, ignore_errors=True)
        output_dir = RUNS / f"output_bundled_setting{i}"
        if not (out / "saved_model.pb").exists() or not (output_dir / "conversion.json").exists():
            conversion = convert(fp32_dir, out, output_dir, flags, label)
        else:
            conversion = json.loads((output_dir / "conversion.json").read_text())
        common.check_memory(fp32_dir, out, signatures=["serving_default"])
        int8_obj, int8 = savedmodel.load_serving_function(out)
        logits_b, token_b, word_b = benchmark.evaluate(int8, batches, label)
        t_fp32, t_int8 = benchmark.time_models([fp32, int8], timing, 3, len(timing))
        rows.append((label, token_b.mean() * 100, (token_a.mean() - token_b.mean()) * 100, word_b.mean() * 100,
                     benchmark.argmax_agreement(logits_a, logits_b), benchmark.mean_kl_divergence(logits_a, logits_b),
                     benchmark.mcnemar_pvalue(token_a, token_b), common.median_ms(t_fp32) / common.median_ms(t_int8),
                     common.size_gb(out) * 1000, conversion["peak_rss_gb"], conversion["seconds"]))
        del int8, int8_obj

    print(f"\nBundled model, {len(token_a)} evaluation passages. FP32: last-token accuracy "
          f"{token_a.mean() * 100:.2f}%, last-word accuracy {word_a.mean() * 100:.2f}%.\n")
    print(f"FP32 SavedModel {common.size_gb(fp32_dir) * 1000:.1f} MB.\n")
    print("| setting | last-token acc. % | drop (points) | last-word acc. % | agreement | KL (nats) "
          "| McNemar p | INT8/FP32 speed | size MB | conversion peak RSS GB | conversion s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, acc, drop, word, agree, kl, pval, speed, size, peak, seconds in rows:
        print(f"| {label} | {acc:.2f} | {drop:+.2f} | {word:.2f} | {agree:.4f} | {kl:.5f} | {pval:.3f} | {speed:.2f}x "
              f"| {size:.1f} | {peak:.2f} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
