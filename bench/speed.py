"""INT8/FP32 speed, size and fidelity at GPT-J-6B's width (1 and 2 layers) and on the bundled model.

    python bench/speed.py            # models are built once under bench/runs/

Batch 1, sequence 128; FP32 and INT8 are timed call by call in turn in one process (warm-up, then
the median of --iterations calls), so machine noise hits both alike. ONEDNN_VERBOSE, in a separate
process, tells which int8 kernels ran.
"""
import argparse
import os
import subprocess
import sys

import common
from common import RUNS

MODELS = [("gptj-6b-width-1l", 1), ("gptj-6b-width-2l", 2), ("bundled-gptj-kjv", None)]


def converted(name):
    out = RUNS / f"converted_{name}"
    if not (out / "saved_model.pb").exists():
        common.check(common.script("quantize.py", "--input_model", RUNS / name, "--converted_model", out,
                                   "--output_dir", RUNS / f"output_{name}", "--calib_samples", "32", cwd=RUNS),
                     "quantize " + name)
    return out


def int8_kernels(model_dir):
    """Kernels oneDNN reports for the INT8 model's matmuls: {implementation: count}."""
    code = ("import sys; sys.path.insert(0, %r); import gptj_int8, common, tensorflow as tf;"
            "from gptj_int8 import savedmodel; _, f = savedmodel.load_serving_function(%r);"
            "b = common.timing_batch(%r); f(input_ids=tf.constant(b[0]), attention_mask=tf.constant(b[1]))"
            % (str(common.REPO / "bench"), str(model_dir), str(model_dir)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_VERBOSE": "1",
                              "PYTHONPATH": str(common.REPO)}).stdout
    kernels = {}
    for line in out.splitlines():
        if line.startswith("onednn_verbose") and ",exec," in line and "src:u8" in line and "wei:s8" in line:
            impl = line.split(",")[6]
            kernels[impl] = kernels.get(impl, 0) + 1
    return kernels


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    from gptj_int8 import benchmark, savedmodel

    rows = []
    for name, n_layer in MODELS:
        fp32_dir = common.prepare(name, n_layer)
        int8_dir = converted(name)
        fp32_obj, fp32 = savedmodel.load_serving_function(fp32_dir)
        int8_obj, int8 = savedmodel.load_serving_function(int8_dir)
        batch = common.timing_batch(fp32_dir)
        cos, agree = common.fidelity(fp32, int8, batch)
        t_fp32, t_int8 = benchmark.time_models([fp32, int8], [batch], args.warmup, args.iterations)
        kernels = int8_kernels(int8_dir)
        rows.append((name, common.median_ms(t_fp32), common.median_ms(t_int8),
                     common.size_gb(fp32_dir), common.size_gb(int8_dir), cos, agree, kernels))
        del fp32, int8, fp32_obj, int8_obj   # free both models before the next size

    print("\n| model | FP32 ms | INT8 ms | INT8/FP32 speed | FP32 GB | INT8 GB | size ratio "
          "| logit cosine | argmax agreement | int8 kernels (oneDNN) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, a, b, sa, sb, cos, agree, kernels in rows:
        k = ", ".join(f"{impl} x{n}" for impl, n in kernels.items()) or "none"
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {sa:.3f} | {sb:.3f} | {sb / sa:.3f} "
              f"| {cos:.5f} | {agree:.3f} | {k} |")


if __name__ == "__main__":
    main()
