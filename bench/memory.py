"""Peak memory and time of quantize.py on models over 2 GB, and the projection to GPT-J-6B.

    python bench/memory.py           # models are built once under bench/runs/

GPT-J-6B's width with 1, 2 and 3 random layers (2.5, 3.3 and 4.1 GB in FP32). quantize.py runs as
its own process; its peak RSS is polled from the OS (psutil, the process and its children).
The converted model is then loaded with plain TensorFlow, run, and compared with FP32.
"""
import argparse
import time

import numpy as np
import psutil

import common
from common import GPTJ_6B_LAYERS, RUNS

def quantize_peak(src, dst):
    """(peak RSS in GB, seconds) of one quantize.py run."""
    start = time.perf_counter()
    proc = common.script("quantize.py", "--input_model", src, "--converted_model", dst,
                         "--output_dir", RUNS / f"output_{src.name}", "--calib_samples", "32", cwd=RUNS)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.05)
    common.check(proc, "quantize " + src.name)
    return peak / 1e9, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args()
    from gptj_int8 import savedmodel

    rows = []
    for n in args.layers:
        src = common.prepare(f"gptj-6b-width-{n}l", n)
        dst = RUNS / f"converted_gptj-6b-width-{n}l-memory"
        peak, seconds = quantize_peak(src, dst)
        fp32_obj, fp32 = savedmodel.load_serving_function(src)
        int8_obj, int8 = savedmodel.load_serving_function(dst)
        cos, agree = common.fidelity(fp32, int8, common.timing_batch(src))
        del fp32, int8, fp32_obj, int8_obj   # free both models before the next size
        rows.append((n, common.size_gb(src), peak, seconds, common.size_gb(dst), cos, agree))

    print("\n| layers | FP32 SavedModel GB | peak RSS of quantize.py GB | peak / model | time s "
          "| INT8 GB | loads, runs: logit cosine | argmax agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for n, size, peak, seconds, int8_size, cos, agree in rows:
        print(f"| {n} | {size:.2f} | {peak:.2f} | {peak / size:.2f}x | {seconds:.0f} | {int8_size:.2f} "
              f"| {cos:.5f} | {agree:.3f} |")
    if len(rows) >= 2:
        layers = np.array([r[0] for r in rows], float)
        fit = lambda col: np.polyfit(layers, np.array([r[col] for r in rows]), 1)
        (size_slope, size_icpt), (peak_slope, peak_icpt), (t_slope, t_icpt) = fit(1), fit(2), fit(3)
        size28 = size_slope * GPTJ_6B_LAYERS + size_icpt
        peak28 = peak_slope * GPTJ_6B_LAYERS + peak_icpt
        print(f"\nPer layer: +{size_slope:.2f} GB of model, +{peak_slope:.2f} GB of peak RSS, +{t_slope:.0f} s.")
        print(f"Projected for {GPTJ_6B_LAYERS} layers (GPT-J-6B): model {size28:.1f} GB, peak RSS {peak28:.1f} GB "
              f"({peak28 / size28:.2f}x), conversion {(t_slope * GPTJ_6B_LAYERS + t_icpt) / 60:.0f} min.")


if __name__ == "__main__":
    main()
