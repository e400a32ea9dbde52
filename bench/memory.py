"""Peak memory and time of prepare_model.py and quantize.py on models over 2 GB, and the projection
to GPT-J-6B.

    python bench/memory.py                   # both; models and checkpoints are built once under bench/runs/
    python bench/memory.py --only prepare    # prepare_model.py on a float16 safetensors checkpoint
    python bench/memory.py --only quantize
    python bench/memory.py --only serving    # the FP32 and INT8 models loaded and called, by signature

GPT-J-6B's width with 1, 2 and 3 random layers (2.5, 3.3 and 4.1 GB in FP32). Each script runs as
its own process; its peak RSS is polled from the OS (psutil, the process and its children).
prepare_model.py reads a PyTorch-layout checkpoint written here first, as GPT-J-6B's float16
revision is stored: float16 safetensors, one shard per layer. quantize.py runs as users run it,
with its defaults (100 calibration passages), twice: with TensorFlow's oneDNN optimizations on
(TF_ENABLE_ONEDNN_OPTS=1, TensorFlow's default on CPUs with AVX-512 VNNI or AMX) and off (=0, its
default on AVX2 CPUs), as their memory differs; its converted model is then loaded with plain
TensorFlow, run, and compared with FP32.

Serving: one process per model and way of calling it (tf.saved_model.load, then the calls below on
a batch of one 32-token prompt, 8 new tokens), its peak RSS. The int8 kernels keep a reordered copy
of their weight per op, so what a process holds depends on which signatures it calls:
serving_default alone (a scoring service), generate alone (a TF Serving client of the in-graph
loop), prefill + decode (generate.py's host loop), and all of them.
"""
import argparse

import numpy as np

import common
from common import GPTJ_6B_LAYERS, GPTJ_6B_WIDTH, RUNS

# TF_ENABLE_ONEDNN_OPTS -> what it means, and on which CPUs it is TensorFlow's default
ONEDNN_SETTINGS = {"1": "oneDNN optimizations on (the default on CPUs with AVX-512 VNNI or AMX)",
                   "0": "oneDNN optimizations off (the default on AVX2 CPUs)"}


def quantize_peak(src, dst, onednn):
    """(peak RSS in GB, seconds) of quantize.py's default command, with TF_ENABLE_ONEDNN_OPTS=`onednn`."""
    return common.script_peak("quantize.py", "--input_model", src, "--converted_model", dst,
                              "--output_dir", RUNS / f"output_{src.name}",
                              extra_env={"TF_ENABLE_ONEDNN_OPTS": onednn})


def float_variables_gb(model_dir):
    from gptj_int8 import memory
    return memory.weight_bytes(model_dir)[0] / 1e9


def write_float16_checkpoint(n_layer, seed=0):
    """A random GPT-J of GPT-J-6B's width as its float16 revision stores it: PyTorch names and
    layouts, float16 safetensors, one shard per layer (and one for the embedding, one for the
    head), written one shard at a time. Returns the folder."""
    import json
    from safetensors.numpy import save_file
    from transformers import GPTJConfig
    from gptj_int8 import checkpoints, models
    folder = RUNS / f"gptj-6b-width-{n_layer}l-fp16-safetensors"
    if (folder / checkpoints.SAFETENSORS_INDEX).exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = GPTJConfig(**models.parse_config_overrides(f"{GPTJ_6B_WIDTH},n_layer={n_layer}"))
    config.architectures = ["GPTJForCausalLM"]
    config.save_pretrained(folder)
    models.gpt2_bpe_tokenizer().save_pretrained(folder)
    layout = checkpoints.pytorch_layout(config)
    groups = {}   # shard -> names: the embedding, each layer, then ln_f and the head
    for name in layout:
        if name.startswith("transformer.h."):
            key = "layer " + name.split(".")[2]
        else:
            key = "embedding" if name.startswith("transformer.wte") else "head"
        groups.setdefault(key, []).append(name)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, names in enumerate(groups.values()):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = layout[name][0]
            if name.endswith(("ln_1.weight", "ln_f.weight")):
                tensors[name] = np.ones(shape, np.float16)
            else:
                tensors[name] = (rng.standard_normal(shape, np.float32) * 0.02).astype(np.float16)
        save_file(tensors, folder / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in names})
        del tensors
    (folder / checkpoints.SAFETENSORS_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def print_projection(rows, size_col, what, size_name="model"):
    """Per-layer growth of model size (`size_name`), peak RSS and time (columns size_col, +1, +2 of
    `rows`, the layer count first), fitted and projected to GPT-J-6B's layers."""
    if len(rows) < 2:
        return
    layers = np.array([r[0] for r in rows], float)
    (size_slope, size_icpt), (peak_slope, peak_icpt), (t_slope, t_icpt) = (
        np.polyfit(layers, np.array([r[col] for r in rows]), 1) for col in (size_col, size_col + 1, size_col + 2))
    size28 = size_slope * GPTJ_6B_LAYERS + size_icpt
    peak28 = peak_slope * GPTJ_6B_LAYERS + peak_icpt
    minutes = (t_slope * GPTJ_6B_LAYERS + t_icpt) / 60
    # times grow with the layers unless something else shared the CPU; a fit that shrinks is noise
    timing = f"{what} {minutes:.0f} min" if t_slope > 0 else f"{what} time not projected (the times did not grow)"
    print(f"\nPer layer: +{size_slope:.2f} GB of {size_name}, +{peak_slope:.2f} GB of peak RSS, {t_slope:+.0f} s.")
    print(f"Projected for {GPTJ_6B_LAYERS} layers (GPT-J-6B): {size_name} {size28:.1f} GB, peak RSS {peak28:.1f} GB "
          f"({peak28 / size28:.2f}x), {timing}.")


def bench_prepare(layers):
    """prepare_model.py from a float16 safetensors checkpoint to the FP32 SavedModel."""
    rows = []
    for n in layers:
        ckpt = write_float16_checkpoint(n)
        dst = RUNS / f"gptj-6b-width-{n}l-from-fp16"
        peak, seconds = common.script_peak("prepare_model.py", "--model", ckpt, "--output_dir", dst, "--overwrite")
        rows.append((n, common.size_gb(ckpt), common.size_gb(dst), peak, seconds))

    print("\n| layers | float16 checkpoint GB | FP32 SavedModel GB | peak RSS of prepare_model.py GB "
          "| peak / model | time s |")
    print("|---|---|---|---|---|---|")
    for n, ckpt_size, size, peak, seconds in rows:
        print(f"| {n} | {ckpt_size:.2f} | {size:.2f} | {peak:.2f} | {peak / size:.2f}x | {seconds:.0f} |")
    print_projection(rows, 2, "export")


def bench_quantize(layers):
    """quantize.py's default command at each size, with oneDNN's optimizations on and off: its peak
    RSS against the FP32 variables, and whether the converted model loads, runs and agrees."""
    from gptj_int8 import savedmodel
    print(f"\nquantize.py, its defaults, on {common.cpu_name()}:")
    for onednn, what in ONEDNN_SETTINGS.items():
        rows = []
        for n in layers:
            src = common.prepare(f"gptj-6b-width-{n}l", n)
            dst = RUNS / f"converted_gptj-6b-width-{n}l-memory"
            peak, seconds = quantize_peak(src, dst, onednn)
            common.check_memory(src, dst, signatures=["serving_default"])
            fp32_obj, fp32 = savedmodel.load_serving_function(src)
            int8_obj, int8 = savedmodel.load_serving_function(dst)
            cos, agree = common.fidelity(fp32, int8, common.timing_batch(src))
            del fp32, int8, fp32_obj, int8_obj   # free both models before the next size
            rows.append((n, float_variables_gb(src), peak, seconds, common.size_gb(dst), cos, agree))
            print(f"TF_ENABLE_ONEDNN_OPTS={onednn}, {n} layer(s): peak {peak:.2f} GB, {seconds:.0f} s", flush=True)

        print(f"\nTF_ENABLE_ONEDNN_OPTS={onednn}: {what}")
        print("| layers | FP32 variables GB | peak RSS of quantize.py GB | peak / variables | time s "
              "| INT8 GB | loads, runs: logit cosine | argmax agreement |")
        print("|---|---|---|---|---|---|---|---|")
        for n, size, peak, seconds, int8_size, cos, agree in rows:
            print(f"| {n} | {size:.3f} | {peak:.2f} | {peak / size:.2f}x | {seconds:.0f} | {int8_size:.2f} "
                  f"| {cos:.5f} | {agree:.3f} |")
        print_projection(rows, 1, "conversion", "FP32 variables")


# Python run by serving_peak after common.model_code has loaded the model as `m`.
SERVING_CALLS = {
    "serving_default": "m.signatures['serving_default'](input_ids=ids, attention_mask=mask)",
    "generate": "m.signatures['generate'](**generation.generate_inputs(m.signatures['generate'], ids, mask, 8))",
    "prefill + decode": "list(generation.stream(m.signatures['prefill'], m.signatures['decode'], ids.numpy(), "
                        "mask.numpy(), 8))",
}
SERVING_CALLS["all"] = "; ".join(SERVING_CALLS.values())


def serving_peak(model_dir, calls):
    """Peak RSS in GB of a process that loads the SavedModel and runs `calls` (SERVING_CALLS) twice."""
    return common.peak_rss_gb_of(common.model_code(model_dir, (
        f"ids = tf.constant([common.token_windows({str(model_dir)!r}, 1, 32)[0]], tf.int32)\n"
        "mask = tf.ones_like(ids)\n"
        f"for _ in range(2): {calls}\n")), f"serving {model_dir}")


def bench_serving(layers):
    """Peak RSS per way of serving, FP32 and INT8, and what each added layer costs."""
    import tensorflow as tf
    rows, int8_gb = {}, {}
    for n in layers:
        fp32_dir = common.prepare(f"gptj-6b-width-{n}l", n)
        int8_dir = common.converted(f"gptj-6b-width-{n}l")
        reader = tf.train.load_checkpoint(str(int8_dir / "variables" / "variables"))
        shapes = reader.get_variable_to_shape_map()
        int8_gb[n] = sum(int(np.prod(shapes[k])) for k, d in reader.get_variable_to_dtype_map().items()
                         if d == tf.int8) / 1e9
        for way, calls in SERVING_CALLS.items():
            rows[(n, way)] = (serving_peak(fp32_dir, calls), serving_peak(int8_dir, calls))
            print(f"{n} layer(s), {way}: FP32 {rows[(n, way)][0]:.2f} GB, INT8 {rows[(n, way)][1]:.2f} GB", flush=True)

    print("\n| way of serving | layers | FP32 peak RSS GB | INT8 peak RSS GB |")
    print("|---|---|---|---|")
    for (n, way), (fp32, int8) in rows.items():
        print(f"| {way} | {n} | {fp32:.2f} | {int8:.2f} |")
    if len(layers) >= 2:
        lo, hi = min(layers), max(layers)
        per_layer_int8 = (int8_gb[hi] - int8_gb[lo]) / (hi - lo)
        print(f"\nPer added layer ({lo} -> {hi} layers; its int8 weights: {per_layer_int8:.3f} GB):")
        print("| way of serving | FP32 GB per layer | INT8 GB per layer | INT8 / its int8 weights "
              f"| projected for {GPTJ_6B_LAYERS} layers: FP32 GB | INT8 GB |")
        print("|---|---|---|---|---|---|")
        for way in SERVING_CALLS:
            fits = [np.polyfit(layers, [rows[(n, way)][i] for n in layers], 1) for i in (0, 1)]
            print(f"| {way} | {fits[0][0]:.2f} | {fits[1][0]:.2f} | {fits[1][0] / per_layer_int8:.2f}x "
                  f"| {np.polyval(fits[0], GPTJ_6B_LAYERS):.1f} | {np.polyval(fits[1], GPTJ_6B_LAYERS):.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--only", choices=["prepare", "quantize", "serving"],
                   help="measure one of them (default: the two scripts)")
    args = p.parse_args()
    RUNS.mkdir(parents=True, exist_ok=True)
    if args.only in (None, "prepare"):
        bench_prepare(args.layers)
    if args.only in (None, "quantize"):
        bench_quantize(args.layers)
    if args.only == "serving":
        bench_serving(args.layers)


if __name__ == "__main__":
    main()
