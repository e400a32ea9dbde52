"""Text generation, FP32 against INT8: GPT-J-6B's width with 1, 2 and 3 layers, and the bundled model.

    python bench/generation.py            # models are built once under bench/runs/
    python bench/generation.py --fresh    # convert them again, after a change to the converter

Prompts of 32 tokens, 32 greedy new tokens, batch 1 and batch 8, through the models' prefill and
decode signatures (a host loop, as generate.py runs them); FP32 and INT8 in turn prompt by
prompt, after one warm-up prompt each. First-token ms is the prefill, next-token ms the median
decode step. Then the same prompts through the `generate` signature (the loop inside the graph,
what a TF Serving client calls): its ms per new token, (time for 32 tokens - time for 1) / 31. Peak RSS comes from a process of its own per model (load, then one batch-8
generation). ONEDNN_VERBOSE, in another process, shows which int8 kernels run in decode (M = batch).

Then: the bare matmuls of one GPT-J-6B-width layer and the lm_head at M=1 and M=8 (what decode
multiplies), the bundled model's next-token time at a 16- and a 200-token prompt (the cache
saves recomputation), and the KV cache's own cost per step in the layout the models use (a
concat that grows) against one preallocated to the context and written in place.
"""
import argparse
import time

import numpy as np

import common
from common import GPTJ_6B_LAYERS

MODELS = [("gptj-6b-width-1l", 1), ("gptj-6b-width-2l", 2), ("gptj-6b-width-3l", 3), ("bundled-gptj-kjv", None)]
FP32_MATMULS = [(4096, 4096, 4), (4096, 16384, 1), (16384, 4096, 1), (4096, 50400, 1)]
INT8_MATMULS = [(4096, 28672, 1), (4096, 4096, 1), (16384, 4096, 1), (4096, 50400, 1)]


def generate_token_ms(generates, batches, new_tokens, eos_token_id):
    """Per model of `generates` (its `generate` signature: the loop inside the graph, as a TF
    Serving client calls it), the median ms per new token: a call for `new_tokens` minus a call
    for one, per batch of `batches` after the first, models in turn batch by batch. A batch whose
    every row produced EOS (the loop may have stopped early) is not counted."""
    import tensorflow as tf
    per_token = [[] for _ in generates]
    for b, ids in enumerate(batches):
        feed = dict(input_ids=tf.constant(ids), attention_mask=tf.constant(np.ones_like(ids)))
        for generate, out in zip(generates, per_token):
            times = []
            for n in (new_tokens, 1):
                start = time.perf_counter()
                sequences = generate(**feed, max_new_tokens=tf.constant(n))["sequences"].numpy()
                times.append(time.perf_counter() - start)
                if n == new_tokens:
                    stopped = (sequences[:, ids.shape[1]:] == eos_token_id).any(axis=1).all()
            if b and not stopped:
                out.append((times[0] - times[1]) / (new_tokens - 1))
    return [common.median_ms(t) if t else float("nan") for t in per_token]


def time_generation(steps, batches, new_tokens):
    """Per model of `steps` ([(prefill, decode)]): (first-token ms, next-token ms), medians over
    `batches` (the first is a warm-up), models in turn batch by batch."""
    from gptj_int8 import generation
    first, following = [[] for _ in steps], [[] for _ in steps]
    for b, ids in enumerate(batches):
        for m, (prefill, decode) in enumerate(steps):
            times, start = [], time.perf_counter()
            for _ in generation.stream(prefill, decode, ids, np.ones_like(ids), new_tokens):
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
            if b:
                first[m].append(times[0])
                following[m].extend(times[1:])
    return [(common.median_ms(f), common.median_ms(n)) for f, n in zip(first, following)]


def peak_rss_gb(model_dir, batch, new_tokens):
    """Peak RSS of a process that loads the model and generates once at `batch`."""
    return common.peak_rss_gb_of(common.model_code(model_dir, (
        f"ids = np.array(common.token_windows({str(model_dir)!r}, {batch}, 32), np.int32)\n"
        "for _ in generation.stream(m.signatures['prefill'], m.signatures['decode'], ids, np.ones_like(ids), "
        f"{new_tokens}): pass\n")), f"generation in {model_dir}")


def cache_step_ms(n_layer, n_head, head_dim, past, context, iterations=10):
    """ms per step of the cache alone at batch 1: (a concat that grows from `past` positions, as
    the decode signature does; a cache of `context` positions written at one, as a preallocated
    layout would), each called as a signature is, its cache coming in and going out as tensors."""
    import tensorflow as tf
    grow = tf.function(lambda cache, new: tf.concat([cache, new], axis=4))
    write = tf.function(lambda cache, new, pos: tf.raw_ops.TensorStridedSliceUpdate(
        input=cache, begin=tf.stack([0, 0, 0, 0, pos, 0]), end=tf.stack([n_layer, 2, 1, n_head, pos + 1, head_dim]),
        strides=tf.ones([6], tf.int32), value=new))
    new = tf.random.normal([n_layer, 2, 1, n_head, 1, head_dim])
    out = []
    for fn, cache, extra in ((grow, tf.random.normal([n_layer, 2, 1, n_head, past, head_dim]), ()),
                             (write, tf.random.normal([n_layer, 2, 1, n_head, context, head_dim]), (tf.constant(past),))):
        fn(cache, new, *extra)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            fn(cache, new, *extra).numpy()[0, 0, 0, 0, 0, 0]
            times.append(time.perf_counter() - start)
        out.append(common.median_ms(times))
        del cache
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=3, help="timed prompts (batches) per model and batch size")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--models", nargs="+", default=[name for name, _ in MODELS], help="a subset of the models")
    p.add_argument("--fresh", action="store_true", help="convert again even if a model exists")
    p.add_argument("--rss_only", action="store_true", help="only the peak RSS of each model's generation process")
    args = p.parse_args()
    import tensorflow as tf
    from gptj_int8 import models

    if args.rss_only:
        print(f"\n| model | FP32 peak RSS GB | INT8 peak RSS GB |   (batch {max(args.batches)}, "
              f"prompt 32, {args.new_tokens} new tokens, one process per model)")
        print("|---|---|---|")
        for name, n_layer in [m for m in MODELS if m[0] in args.models]:
            fp32_dir, int8_dir = common.prepare(name, n_layer), common.converted(name, args.fresh)
            print(f"| {name} | {peak_rss_gb(fp32_dir, max(args.batches), args.new_tokens):.2f} "
                  f"| {peak_rss_gb(int8_dir, max(args.batches), args.new_tokens):.2f} |", flush=True)
        return

    rows, kernels = [], {}
    for name, n_layer in [m for m in MODELS if m[0] in args.models]:
        fp32_dir = common.prepare(name, n_layer)
        int8_dir = common.converted(name, args.fresh)
        common.check_memory(fp32_dir, int8_dir)
        loaded = [tf.saved_model.load(str(d)) for d in (fp32_dir, int8_dir)]
        steps = [(m.signatures["prefill"], m.signatures["decode"]) for m in loaded]
        eos_token_id, _ = models.generation_settings(fp32_dir)
        for batch in args.batches:
            prompts = common.token_windows(fp32_dir, batch * (args.prompts + 1), 32)
            batches = [np.array(prompts[i * batch:(i + 1) * batch], np.int32) for i in range(args.prompts + 1)]
            (f_first, f_next), (i_first, i_next) = time_generation(steps, batches, args.new_tokens)
            f_gen, i_gen = generate_token_ms([m.signatures["generate"] for m in loaded], batches, args.new_tokens,
                                             eos_token_id)
            rows.append([name, n_layer, batch, f_first, i_first, f_next, i_next, f_gen, i_gen])
        del loaded, steps
        for row in rows[-len(args.batches):]:
            row += [peak_rss_gb(fp32_dir, max(args.batches), args.new_tokens),
                    peak_rss_gb(int8_dir, max(args.batches), args.new_tokens)]
        kernels[name] = common.int8_kernels(int8_dir, common.DECODE_CALL)

    print(f"\nPrompt 32 tokens, {args.new_tokens} greedy new tokens; medians of {args.prompts} prompts (batches).\n")
    print("| model | batch | FP32 first token ms | INT8 first token ms | first-token speed-up "
          "| FP32 next token ms | INT8 next token ms | next-token speed-up "
          "| FP32 `generate` ms/token | INT8 `generate` ms/token | `generate` speed-up "
          "| FP32 peak RSS GB | INT8 peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, _, batch, f_first, i_first, f_next, i_next, f_gen, i_gen, f_rss, i_rss in rows:
        print(f"| {name} | {batch} | {f_first:.1f} | {i_first:.1f} | {f_first / i_first:.2f}x | {f_next:.2f} "
              f"| {i_next:.2f} | {f_next / i_next:.2f}x | {f_gen:.2f} | {i_gen:.2f} | {f_gen / i_gen:.2f}x "
              f"| {f_rss:.2f} | {i_rss:.2f} |")
    print(f"\n(peak RSS: one process per model, batch {max(args.batches)})")
    for batch in args.batches:
        wide = [r for r in rows if r[1] is not None and r[2] == batch]
        if len(wide) >= 2:
            layers = [r[1] for r in wide]
            fits = [np.polyfit(layers, [r[i] for r in wide], 1) for i in (5, 6)]
            fp32, int8 = (np.polyval(f, GPTJ_6B_LAYERS) for f in fits)
            print(f"Batch {batch}, next token per layer: FP32 +{fits[0][0]:.2f} ms, INT8 +{fits[1][0]:.2f} ms "
                  f"({fits[0][0] / fits[1][0]:.2f}x); projected for {GPTJ_6B_LAYERS} layers: FP32 {fp32:.0f} ms, "
                  f"INT8 {int8:.0f} ms per token, {fp32 / int8:.2f}x.")

    print("\nint8 kernels oneDNN ran in decode (3 steps after a 32-token prefill, batch 1; rows: mb for the "
          "inner product, iw for the convolution):")
    for name, found in kernels.items():
        decode = {k: n for k, n in found.items() if common.one_row(k[1])}
        print(f"- {name}: " + (", ".join(f"{impl} {shape} x{n}" for (impl, shape), n in sorted(decode.items()))
                               or "none"))

    print("\n| bare matmul, M x K @ K x N | M | FP32 ms | int8 matmul ms | int8 conv ms | INT8/FP32 speed (faster form) |")
    print("|---|---|---|---|---|---|")
    shapes = sorted({(k, n) for k, n, _ in FP32_MATMULS + INT8_MATMULS})
    for m in (1, 8):
        common.print_matmul_rows(common.matmul_times(shapes, m), FP32_MATMULS, INT8_MATMULS, f"{m} | ")

    fp32_dir, int8_dir = common.prepare("bundled-gptj-kjv"), common.converted("bundled-gptj-kjv")
    common.check_memory(fp32_dir, int8_dir)
    loaded = [tf.saved_model.load(str(d)) for d in (fp32_dir, int8_dir)]
    steps = [(m.signatures["prefill"], m.signatures["decode"]) for m in loaded]
    print("\nBundled model, next token ms after a prompt of 16 and of 200 tokens (batch 1, 32 new tokens):")
    by_length = {}
    for length in (16, 200):
        batches = [np.array([w], np.int32) for w in common.token_windows(fp32_dir, 6, length)]
        by_length[length] = [n for _, n in time_generation(steps, batches, 32)]
    for m, label in enumerate(("FP32", "INT8")):
        print(f"- {label}: {by_length[16][m]:.2f} ms at 16, {by_length[200][m]:.2f} ms at 200 "
              f"({by_length[200][m] / by_length[16][m]:.2f}x)")

    print("\nKV cache alone, ms per step and layer at GPT-J-6B's shape (16 heads of 256, batch 1), "
          "context 2048:")
    print("| positions so far | grows by concat (ours) | preallocated, written in place |")
    print("|---|---|---|")
    for past in (64, 512, 1984):
        grow, write = cache_step_ms(1, 16, 256, past, 2048)
        print(f"| {past} | {grow:.2f} | {write:.2f} |")


if __name__ == "__main__":
    main()
