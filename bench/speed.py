"""INT8/FP32 speed, size and fidelity at GPT-J-6B's width (1, 2 and 3 layers) and on the bundled model.

    python bench/speed.py            # models are built once under bench/runs/
    python bench/speed.py --fresh    # convert them again, after a change to the converter

Batch 1, sequence 128; FP32 and INT8 are timed call by call in turn in one process (warm-up, then
the median of --iterations calls), so machine noise hits both alike. ONEDNN_VERBOSE, in a separate
process, tells which int8 kernels ran.

Then the ceiling: the bare matmuls of one GPT-J-6B-width layer and the lm_head (128 x K @ K x N),
as tf.matmul in FP32 and as the converter's int8 kernel, timed the same way. The INT8/FP32 ratio
of their sums is what the int8 GEMM itself gives on this CPU; a whole model's ratio cannot
exceed it by much, as those matmuls are nearly all of its time.
"""
import argparse

import numpy as np

import common
from common import GPTJ_6B_LAYERS

MODELS = [("gptj-6b-width-1l", 1), ("gptj-6b-width-2l", 2), ("gptj-6b-width-3l", 3), ("bundled-gptj-kjv", None)]
# (K, N, how many per layer): the FP32 model's matmuls, and the INT8 model's (q, k, v and fc_in
# in one kernel); the lm_head last.
FP32_MATMULS = [(4096, 4096, 4), (4096, 16384, 1), (16384, 4096, 1), (4096, 50400, 1)]
INT8_MATMULS = [(4096, 28672, 1), (4096, 4096, 1), (16384, 4096, 1), (4096, 50400, 1)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fresh", action="store_true", help="convert again even if a model exists")
    args = p.parse_args()
    from gptj_int8 import benchmark, savedmodel

    rows = []
    for name, n_layer in MODELS:
        fp32_dir = common.prepare(name, n_layer)
        int8_dir = common.converted(name, args.fresh)
        common.check_memory(fp32_dir, int8_dir, signatures=["serving_default"])
        fp32_obj, fp32 = savedmodel.load_serving_function(fp32_dir)
        int8_obj, int8 = savedmodel.load_serving_function(int8_dir)
        batch = common.timing_batch(fp32_dir)
        cos, agree = common.fidelity(fp32, int8, batch)
        t_fp32, t_int8 = benchmark.time_models([fp32, int8], [batch], args.warmup, args.iterations)
        kernels = common.int8_kernels(int8_dir, common.SERVING_CALL)
        rows.append((name, n_layer, common.median_ms(t_fp32), common.median_ms(t_int8),
                     common.size_gb(fp32_dir), common.size_gb(int8_dir), cos, agree, kernels))
        del fp32, int8, fp32_obj, int8_obj   # free both models before the next size

    print("\n| model | FP32 ms | INT8 ms | INT8/FP32 speed | FP32 GB | INT8 GB | size ratio "
          "| logit cosine | argmax agreement | int8 kernels (oneDNN) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, _, a, b, sa, sb, cos, agree, kernels in rows:
        k = ", ".join(f"{impl} x{n}" for impl, n in common.count_by_impl(kernels).items()) or "none"
        print(f"| {name} | {a:.1f} | {b:.1f} | {a / b:.2f}x | {sa:.3f} | {sb:.3f} | {sb / sa:.3f} "
              f"| {cos:.5f} | {agree:.3f} | {k} |")
    # latency grows linearly with layers; the lm_head, half of a 1-layer model's matmul work, weighs ever less
    layers = [r[1] for r in rows if r[1] is not None]
    fit = [np.polyfit(layers, [r[i] for r in rows if r[1] is not None], 1) for i in (2, 3)]
    fp32_layer, int8_layer = fit[0][0], fit[1][0]
    fp32, int8 = (np.polyval(f, GPTJ_6B_LAYERS) for f in fit)
    print(f"\nPer layer: FP32 +{fp32_layer:.1f} ms, INT8 +{int8_layer:.1f} ms ({fp32_layer / int8_layer:.2f}x); "
          f"projected for {GPTJ_6B_LAYERS} layers (GPT-J-6B): FP32 {fp32 / 1000:.1f} s, INT8 {int8 / 1000:.1f} s, "
          f"{fp32 / int8:.2f}x.")

    times = common.matmul_times(sorted({(k, n) for k, n, _ in FP32_MATMULS + INT8_MATMULS}), 128)
    print("\n| bare matmul, 128 x K @ K x N | FP32 ms | int8 matmul ms | int8 conv ms | INT8/FP32 speed (faster form) |")
    print("|---|---|---|---|---|")
    common.print_matmul_rows(times, FP32_MATMULS, INT8_MATMULS)

if __name__ == "__main__":
    main()
