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
saves recomputation), and long contexts (also alone, --long_context_only): the next token after
64 and after 1984 positions through decode and generate, the KV cache's own cost per step and
layer (written in place, as the models do, against the former concat), and the peak RSS of a
process generating a full context of 2048 tokens. Last (also alone, --sampling_only): INT8's ms per
new token through `generate`, greedy against sampled (temperature 1, top_k 50, top_p 0.9, both),
the settings in turn prompt by prompt; then the sampler alone, over a decode that returns fixed
logits. The random-weight models' next-token distributions are nearly flat, so their top_p 0.9
keeps most of the vocabulary and ends where tokens are densest: the hard case for top_p, which
sorts only the tokens in the interval of logit value where the nucleus ends.
"""
import argparse
import time

import numpy as np

import common
from common import GPTJ_6B_LAYERS

MODELS = [("gptj-6b-width-1l", 1), ("gptj-6b-width-2l", 2), ("gptj-6b-width-3l", 3), ("bundled-gptj-kjv", None)]

FP32_MATMULS = [(4096, 4096, 4), (4096, 16384, 1), (16384, 4096, 1), (4096, 50400, 1)]
INT8_MATMULS = [(4096, 28672, 1), (4096, 4096, 1), (16384, 4096, 1), (4096, 50400, 1)]


def sampling_settings():
    """(label, generation.Sampling) timed by --sampling_only, greedy first."""
    from gptj_int8.generation import GREEDY, Sampling
    return [("greedy", GREEDY), ("temperature 1", Sampling(1.0, 0, 1.0, 1)), ("top_k 50", Sampling(1.0, 50, 1.0, 1)),
            ("top_p 0.9", Sampling(1.0, 0, 0.9, 1)), ("top_k 50, top_p 0.9", Sampling(1.0, 50, 0.9, 1))]


def generate_token_ms(runs, batches, new_tokens, eos_token_id):
    """Per run of `runs` ((a model's `generate` signature: the loop inside the graph, as a TF Serving
    client calls it; a generation.Sampling)), the median of generate_token_seconds, in ms."""
    return [common.median_ms([t for t in times if t is not None]) if any(t is not None for t in times)
            else float("nan") for times in generate_token_seconds(runs, batches, new_tokens, eos_token_id)]


def generate_token_seconds(runs, batches, new_tokens, eos_token_id):
    """Per run of `runs` (as generate_token_ms), the seconds per new token at each batch of `batches`
    after the first: a call for `new_tokens` minus a call for one, runs in turn batch by batch. None
    for a batch whose every row produced EOS (the loop may have stopped early)."""
    from gptj_int8 import generation
    per_token = [[] for _ in runs]
    for b, ids in enumerate(batches):
        for (generate, sampling), out in zip(runs, per_token):
            times = []
            for n in (new_tokens, 1):
                feed = generation.generate_inputs(generate, ids, np.ones_like(ids), n, sampling)
                start = time.perf_counter()
                sequences = generate(**feed)["sequences"].numpy()
                times.append(time.perf_counter() - start)
                if n == new_tokens:
                    stopped = (sequences[:, ids.shape[1]:] == eos_token_id).any(axis=1).all()
            if b:
                out.append(None if stopped else (times[0] - times[1]) / (new_tokens - 1))
    return per_token


def sampling_generate(loaded, model_dir):
    """The model's `generate` when it samples; for a model converted before sampling existed, one built
    over its decode in this process, as the conversion builds it now (generation.generate_signature)."""
    from gptj_int8 import generation, models
    generate = loaded.signatures["generate"]
    if "temperature" in generate.structured_input_signature[1]:
        return generate
    print(f"({model_dir.name}'s `generate` is greedy only: timing one built over its decode)")
    return generation.generate_signature(loaded.signatures["decode"], *models.generation_settings(model_dir))


def sampling_token_ms(name, batches, new_tokens, prompts):
    """Rows (batch, [INT8 ms per new token through `generate` for each of sampling_settings()],
    [each sampled setting's median of its time / greedy's over the same prompts]) of the model
    `name`, the settings in turn prompt by prompt, medians of `prompts` after a warm-up. The ratio
    of each prompt's own pair stands up to the machine's drift between prompts."""
    import tensorflow as tf
    from gptj_int8 import models
    common.prepare(name, dict(MODELS)[name])
    int8_dir = common.converted(name)
    common.check_memory(int8_dir, signatures=["generate"])
    loaded = tf.saved_model.load(str(int8_dir))
    generate = sampling_generate(loaded, int8_dir)
    eos_token_id, _ = models.generation_settings(int8_dir)
    rows = []
    for batch in batches:
        windows = common.token_windows(int8_dir, batch * (prompts + 1), 32)
        prompt_batches = [np.array(windows[i * batch:(i + 1) * batch], np.int32) for i in range(prompts + 1)]
        runs = [(generate, sampling) for _, sampling in sampling_settings()]
        greedy, *sampled = generate_token_seconds(runs, prompt_batches, new_tokens, eos_token_id)
        ratios = [float(np.median([t / g for t, g in zip(times, greedy) if t is not None and g is not None]))
                  for times in sampled]
        ms = [common.median_ms([t for t in times if t is not None]) for times in (greedy, *sampled)]
        rows.append((batch, ms, ratios))
    return rows


def sampler_token_ms(batch, new_tokens=65, prompts=6, vocab=50400):
    """[ms per new token for each of sampling_settings()] of `generate` over a decode that only
    returns fixed logits of GPT-J's vocabulary (random, nearly flat, as the random-weight models'):
    the sampler's own cost inside the loop, apart from the model's time and its noise."""
    import tensorflow as tf
    from gptj_int8 import generation
    logits = tf.random.stateless_normal([batch, vocab], [0, 0]) * 0.1

    @tf.function(input_signature=generation.input_specs(generation.DECODE, generation.cache_spec(1, 1, 1)))
    def decode(input_ids, attention_mask, past_key_values):
        # a new position changes the logits a little, as a model's would
        return {"logits": logits + 1e-3 * tf.cast(tf.shape(attention_mask)[1], tf.float32),
                generation.CACHE: past_key_values}
    generate = generation.generate_signature(decode, -1, 1 << 20)   # no token is EOS
    ids = np.ones((batch, 32), np.int32)
    return generate_token_ms([(generate, sampling) for _, sampling in sampling_settings()], [ids] * (prompts + 1),
                             new_tokens, -1)


def print_sampling_cost(args):
    from gptj_int8 import cli
    print(f"\nINT8 ms per new token through `generate`, greedy against sampled ({args.new_tokens} new tokens after "
          f"32-token prompts; medians of {args.prompts} prompts, the settings in turn; in brackets the median of "
          f"each prompt's sampled / greedy time; {cli.cpu_name()}, {time.strftime('%Y-%m-%d')}):")
    labels = [label for label, _ in sampling_settings()]
    print("| model | batch | " + " | ".join(labels) + " |")
    print("|---|---|" + "---|" * len(labels))
    for name in [name for name, _ in MODELS if name in args.models]:
        for batch, (greedy, *sampled), ratios in sampling_token_ms(name, args.batches, args.new_tokens, args.prompts):
            print(f"| {name} | {batch} | {greedy:.2f} | "
                  + " | ".join(f"{t:.2f} ({(r - 1) * 100:+.1f}%)" for t, r in zip(sampled, ratios)) + " |", flush=True)
    print("\nThe sampler alone: ms per new token through `generate` over a decode that returns fixed, nearly flat "
          "logits of 50400 tokens (64 new tokens, medians of 6 calls):")
    print("| batch | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for batch in args.batches:
        print(f"| {batch} | " + " | ".join(f"{t:.2f}" for t in sampler_token_ms(batch)) + " |", flush=True)


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


def cache_step_ms(batch, past, n_head=16, head_dim=256, iterations=10):
    """ms per step and layer of the KV cache at GPT-J-6B's shape, `past` positions so far: (the models'
    in-place write and the attention over the cache (kv_cache.attend), the former layout: a concat
    that grows, then the same attention), each a function called as a signature is, its cache
    coming in and going out. The attention's two matmuls read the whole cache in both."""
    import tensorflow as tf
    from gptj_int8 import kv_cache

    @tf.function
    def in_place(cache, mask, q, k, v):
        cache = kv_cache.ensure_capacity(cache, tf.shape(mask)[1])
        shape = tf.shape(cache)
        visible, padding = kv_cache.masks(mask, 1, shape[4])
        rows = kv_cache.key_rows(shape[2], shape[3], shape[4], tf.shape(mask)[1] - 1, 1)
        out, flat = kv_cache.attend(tf.reshape(cache, [-1, head_dim]), 0, rows, q, k, v, visible[None, None],
                                    padding, head_dim ** 0.5, shape)
        return out, tf.reshape(flat, shape)

    @tf.function
    def concat(cache, mask, q, k, v):
        keys, values = tf.concat([cache[0, 0], k], 2), tf.concat([cache[0, 1], v], 2)
        scores = tf.matmul(q, keys, transpose_b=True) / head_dim ** 0.5
        return tf.matmul(tf.nn.softmax(scores), values), tf.stack([tf.stack([keys, values])])

    q, k, v = (tf.random.normal([batch, n_head, 1, head_dim]) for _ in range(3))
    mask = tf.ones([batch, past + 1], tf.int32)
    out = []
    for fn, length in ((in_place, kv_cache.capacity_for(past + 1)), (concat, past)):
        cache = tf.random.normal([1, 2, batch, n_head, length, head_dim])
        out.append(common.median_ms(common.seconds_per_call(lambda: fn(cache, mask, q, k, v)[0].numpy(), iterations)))
        cache = None                       # freed before the next layout's cache is made
    return out


def write_candidates_ms(past=1984, capacity=2048, steps=8, n_head=16, head_dim=256):
    """Per way TensorFlow offers to write one position's keys into a cache of `capacity` positions
    inside a tf.while_loop (batch 1, GPT-J-6B's head shape, `past` positions in), then read them
    with one query as the attention does: (label, ms per step). The first row is the read alone; a
    write that copies the cache, or whose buffer cannot be reused while a reader holds it, adds a
    copy of the cache to it. (Without the read, the optimiser drops the writes: nothing to time.)"""
    import tensorflow as tf
    new = tf.random.normal([1, n_head, 1, head_dim])
    query = tf.random.normal([1, n_head, 1, head_dim])
    attend = lambda keys: tf.reduce_sum(tf.matmul(query, keys, transpose_b=True))

    def scatter(cache, pos):
        index = tf.stack([tf.zeros([n_head], tf.int32), tf.range(n_head), tf.fill([n_head], pos)], 1)
        return tf.tensor_scatter_nd_update(cache, index, new[0, :, 0])

    def strided(cache, pos):
        return tf.raw_ops.TensorStridedSliceUpdate(input=cache, begin=tf.stack([0, 0, pos, 0]),
                                                   end=tf.stack([1, n_head, pos + 1, head_dim]),
                                                   strides=[1, 1, 1, 1], value=new)

    def in_place(cache, pos):
        rows = tf.range(n_head) * capacity + pos
        flat = tf.raw_ops.InplaceUpdate(x=tf.reshape(cache, [-1, head_dim]), i=rows, v=new[0, :, 0])
        return tf.reshape(flat, tf.shape(cache))

    def concat(cache, pos):
        return tf.concat([cache, new], axis=2)

    def per_step(loop, *args):
        return min(common.seconds_per_call(lambda: loop(*args).numpy(), 3)) / steps * 1000

    def loop_of(write):
        @tf.function
        def loop(keys):
            def body(i, total, keys):
                keys = write(keys, past + i)
                return i + 1, total + attend(keys), keys
            return tf.while_loop(lambda i, *_: i < steps, body, (0, 0.0, keys),
                                 shape_invariants=(tf.TensorShape([]), tf.TensorShape([]), tf.TensorShape(None)))[1]
        return loop

    full = tf.random.normal([1, n_head, capacity, head_dim])
    rows = [(label, per_step(loop_of(write), cache))
            for label, write, cache in (
                ("the read alone, no write", lambda cache, pos: cache, full),
                ("InplaceUpdate on a 2-D view (the models' way)", in_place, full),
                ("tensor_scatter_nd_update", scatter, full),
                ("TensorStridedSliceUpdate", strided, full),
                ("concat that grows (the former layout)", concat, full[:, :, :past]))]

    variable = tf.Variable(full)

    @tf.function
    def variable_loop():
        total = 0.0
        for i in tf.range(steps):
            variable[:, :, past + i].assign(new[:, :, 0])
            total += attend(variable)
        return total

    @tf.function
    def array_loop():
        cache = tf.TensorArray(tf.float32, size=capacity, element_shape=[1, n_head, head_dim])
        total = 0.0
        for i in tf.range(steps):
            cache = cache.write(past + i, new[:, :, 0])
            total += attend(tf.transpose(cache.stack(), [1, 2, 0, 3]))
        return total

    rows.append(("tf.Variable, sliced assign (one cache shared by every call)", per_step(variable_loop)))
    rows.append(("TensorArray, an element per position (read: stacked)", per_step(array_loop)))
    return rows


def decode_step_ms(decodes, n_layer, batch, past, iterations=8):
    """Per decode signature of `decodes` (FP32, INT8 of one model), the median ms of a step after
    `past` positions: the cache is filled with random keys and values (a step costs the same whatever
    they are), each step passes the returned cache on, models in turn step by step."""
    import tensorflow as tf
    from gptj_int8 import kv_cache
    caches = [tf.random.normal([n_layer, 2, batch, 16, kv_cache.capacity_for(past + iterations + 1), 256])
              for _ in decodes]
    ids = tf.zeros([batch, 1], tf.int32)
    times = [[] for _ in decodes]
    for step in range(iterations + 1):
        mask = tf.ones([batch, past + step + 1], tf.int32)
        for m, decode in enumerate(decodes):
            start = time.perf_counter()
            out = decode(input_ids=ids, attention_mask=mask, past_key_values=caches[m])
            out["logits"].numpy()
            if step:
                times[m].append(time.perf_counter() - start)
            caches[m] = out["past_key_values"]
    return [common.median_ms(t) for t in times]


def long_context(name, n_layer, batches, contexts=(64, 1984), with_generate=False, new_tokens=64, repeats=3):
    """Rows (model, batch, way, FP32 ms at each context, INT8 ms at each context) of the next token
    after a short and a long context: through the decode signature (a host loop) at every batch, and
    with `with_generate` through the `generate` signature at batch 1, where every call runs its prompt
    through the model first: per token (a call for `new_tokens` - a call for one) / (`new_tokens` - 1),
    the median of `repeats`."""
    import tensorflow as tf
    from gptj_int8 import generation, models
    fp32_dir, int8_dir = common.prepare(name, n_layer), common.converted(name)
    common.check_memory(fp32_dir, int8_dir)
    loaded = [tf.saved_model.load(str(d)) for d in (fp32_dir, int8_dir)]
    rows = []

    def add(batch, way, by_context):          # by_context: [[FP32 ms, INT8 ms] per context]
        rows.append((name, batch, way, [c[0] for c in by_context], [c[1] for c in by_context]))

    for batch in batches:
        add(batch, "decode", [decode_step_ms([m.signatures["decode"] for m in loaded], n_layer, batch, c)
                              for c in contexts])
    if with_generate:
        eos_token_id, _ = models.generation_settings(fp32_dir)
        rng = np.random.default_rng(0)
        # a short warm-up prompt, then `repeats` of the context's length (tokens other than EOS)
        add(1, "generate", [generate_token_ms([(m.signatures["generate"], generation.GREEDY) for m in loaded],
                                              [rng.integers(0, eos_token_id, (1, n), dtype=np.int32)
                                               for n in (8, *[c] * repeats)], new_tokens, eos_token_id)
                            for c in contexts])
    return rows


def rss_while_generating(model_dir, total=2048, prompt=32):
    """(peak RSS GB of a process generating `total` - `prompt` tokens through `generate` at batch 1, of
    one generating 16): what the cache of a full context adds to a process."""
    out = []
    for new in (total - prompt, 16):
        out.append(common.peak_rss_gb_of(common.model_code(model_dir, (
            f"ids = np.array(common.token_windows({str(model_dir)!r}, 1, {prompt}), np.int32)\n"
            "m.signatures['generate'](**generation.generate_inputs(m.signatures['generate'], ids, np.ones_like(ids), "
            f"{new}))['sequences'].numpy()\n")), f"generation in {model_dir}"))
    return out


def print_long_context(args):
    contexts = (64, 1984)
    rows = [r for name, n_layer in MODELS if n_layer and name in args.models
            for r in long_context(name, n_layer, args.batches, contexts, with_generate=n_layer == 1)]
    if rows:            # only when models of GPT-J-6B's width were chosen
        print(f"\nNext token after a context of {contexts[0]} and of {contexts[1]} positions, GPT-J-6B's width "
              "(decode: a step over a cache of that many random positions, median of 8 steps; generate, 1 layer: "
              "per token of 64 after a prompt of that length, median of 3 calls):")
        print("| model | batch | called through | FP32 ms at 64 | FP32 ms at 1984 | FP32 1984/64 "
              "| INT8 ms at 64 | INT8 ms at 1984 | INT8 1984/64 |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, batch, way, (f_short, f_long), (i_short, i_long) in rows:
            print(f"| {name} | {batch} | {way} | {f_short:.1f} | {f_long:.1f} | {f_long / f_short:.2f}x "
                  f"| {i_short:.1f} | {i_long:.1f} | {i_long / i_short:.2f}x |")
    print("\nWriting one position's keys into a 2048-position cache inside a tf.while_loop, then reading them "
          "with one query (batch 1, 1984 positions in, 16 heads of 256), ms per step:")
    print("| way | write, then the attention's read of the keys |")
    print("|---|---|")
    for label, ms in write_candidates_ms():
        print(f"| {label} | {ms:.2f} |")
    print("\nKV cache alone, ms per step and layer at GPT-J-6B's shape (16 heads of 256): written in place "
          "and read by the attention, against the former layout grown by a concat:")
    print("| batch | positions so far | cache MB per layer | in place + attention | concat + attention |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        for past in (64, 512, 1984):
            in_place, concat = cache_step_ms(batch, past)
            print(f"| {batch} | {past} | {2 * batch * 16 * past * 256 * 4 / 1e6:.0f} | {in_place:.2f} | {concat:.2f} |")
    name = "gptj-6b-width-1l"
    if name not in args.models:
        return
    print(f"\nPeak RSS GB of a process generating 2016 tokens after a 32-token prompt through `generate` "
          f"({name}, batch 1), against one generating 16:")
    for label, model_dir in (("FP32", common.prepare(name, 1)), ("INT8", common.converted(name))):
        full, short = rss_while_generating(model_dir)
        print(f"- {label}: {full:.2f} GB against {short:.2f} GB (+{(full - short) * 1000:.0f} MB; the cache of "
              f"2048 positions is {2 * 16 * 2048 * 256 * 4 / 1e6:.0f} MB per layer)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=3, help="timed prompts (batches) per model and batch size")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--models", nargs="+", default=[name for name, _ in MODELS], help="a subset of the models")
    p.add_argument("--fresh", action="store_true", help="convert again even if a model exists")
    p.add_argument("--rss_only", action="store_true", help="only the peak RSS of each model's generation process")
    p.add_argument("--long_context_only", action="store_true",
                   help="only the next token after a short and a long context, the cache alone, and the peak RSS "
                        "while generating a full context")
    p.add_argument("--sampling_only", action="store_true",
                   help="only INT8's ms per token through `generate`, greedy against sampled")
    args = p.parse_args()
    import tensorflow as tf
    from gptj_int8 import generation, models

    if args.sampling_only:
        print_sampling_cost(args)
        return

    if args.rss_only:
        print(f"\n| model | FP32 peak RSS GB | INT8 peak RSS GB |   (batch {max(args.batches)}, "
              f"prompt 32, {args.new_tokens} new tokens, one process per model)")
        print("|---|---|---|")
        for name, n_layer in [m for m in MODELS if m[0] in args.models]:
            fp32_dir, int8_dir = common.prepare(name, n_layer), common.converted(name, args.fresh)
            print(f"| {name} | {peak_rss_gb(fp32_dir, max(args.batches), args.new_tokens):.2f} "
                  f"| {peak_rss_gb(int8_dir, max(args.batches), args.new_tokens):.2f} |", flush=True)
        return

    if args.long_context_only:
        print_long_context(args)
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
            f_gen, i_gen = generate_token_ms([(m.signatures["generate"], generation.GREEDY) for m in loaded], batches,
                                             args.new_tokens, eos_token_id)
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
    del loaded, steps

    print_long_context(args)
    print_sampling_cost(args)


if __name__ == "__main__":
    main()
