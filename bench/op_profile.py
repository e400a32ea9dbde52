"""Where the time goes: the FP32 and INT8 models' ops, by type, side by side.

    python bench/op_profile.py                               # GPT-J-6B width, 1 layer (bench/runs/)
    python bench/op_profile.py --model bundled-gptj-kjv

Then oneDNN's own account of the INT8 model's int8 kernels (ONEDNN_VERBOSE): each shape's calls
and their fastest, median and slowest time, over --iterations calls of serving_default.

Each model runs in a TensorFlow session with a full trace (RunMetadata step stats), once over a
prompt of --seq_len tokens (serving_default) and once per next token (decode, after a prefill of
the same prompt; batch 1); the time of every op is summed by op type, the median over
--iterations traced runs. Tracing adds a fixed cost to every op, so small ops look slower than
they are untraced; the totals are for comparing the two models, op type by op type.
"""
import argparse
import collections

import numpy as np

import common
from gptj_int8 import cli

MODELS = {"gptj-6b-width-1l": 1, "bundled-gptj-kjv": None}


def op_times(model_dir, seq_len, iterations):
    """{signature: {op type: (median ms per run, ops per run)}} for serving_default and decode."""
    import tensorflow as tf
    ids, mask = common.timing_batch(model_dir, seq_len)[:2]
    common.check_memory(model_dir)
    result = {}
    with tf.compat.v1.Session(graph=tf.Graph()) as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(model_dir))
        sigs = meta.signature_def

        def feed(sig, **values):
            return {sigs[sig].inputs[k].name: v for k, v in values.items()}

        runs = {"serving_default": (sigs["serving_default"].outputs["logits"].name,
                                    feed("serving_default", input_ids=ids, attention_mask=mask))}
        if "decode" in sigs:
            cache = sess.run(sigs["prefill"].outputs["past_key_values"].name,
                             feed("prefill", input_ids=ids[:, :-1], attention_mask=mask[:, :-1]))
            runs["decode"] = (sigs["decode"].outputs["logits"].name,
                              feed("decode", input_ids=ids[:, -1:], attention_mask=mask, past_key_values=cache))
        options = tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE)
        for name, (fetch, values) in runs.items():
            for _ in range(2):
                sess.run(fetch, values)
            per_run = []
            for _ in range(iterations):
                metadata = tf.compat.v1.RunMetadata()
                sess.run(fetch, values, options=options, run_metadata=metadata)
                totals, counts = collections.Counter(), collections.Counter()
                for device in metadata.step_stats.dev_stats:
                    for node in device.node_stats:
                        # "name = Op(inputs)"; node names inside functions are not unique, op types are
                        op = node.timeline_label.split(" = ", 1)[1].split("(")[0] if " = " in node.timeline_label else None
                        if op:
                            totals[op] += node.op_end_rel_micros / 1000
                            counts[op] += 1
                per_run.append((totals, counts))
            ops = set().union(*(t for t, _ in per_run))
            result[name] = {op: (float(np.median([t[op] for t, _ in per_run])), per_run[0][1][op]) for op in ops}
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(MODELS), default="gptj-6b-width-1l")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--top", type=int, default=12, help="op types shown per signature")
    p.add_argument("--fresh", action="store_true", help="convert again even if a model exists")
    args = p.parse_args()

    fp32_dir = common.prepare(args.model, MODELS[args.model])
    int8_dir = common.converted(args.model, args.fresh)
    fp32, int8 = op_times(fp32_dir, args.seq_len, args.iterations), op_times(int8_dir, args.seq_len, args.iterations)
    print(f"\nCPU: {cli.cpu_name()}; {args.model}, batch 1, prompt {args.seq_len} tokens; traced ms per run\n")
    for name in fp32:
        print(f"{name}:\n")
        print("| op type | FP32 ms | FP32 ops | INT8 ms | INT8 ops |")
        print("|---|---|---|---|---|")
        ops = sorted(set(fp32[name]) | set(int8[name]),
                     key=lambda op: -max(fp32[name].get(op, (0, 0))[0], int8[name].get(op, (0, 0))[0]))
        for op in ops[:args.top]:
            a, b = fp32[name].get(op, (0.0, 0)), int8[name].get(op, (0.0, 0))
            print(f"| {op} | {a[0]:.2f} | {a[1]} | {b[0]:.2f} | {b[1]} |")
        rest = ops[args.top:]
        print(f"| {len(rest)} other op types | {sum(fp32[name].get(o, (0, 0))[0] for o in rest):.2f} | "
              f"| {sum(int8[name].get(o, (0, 0))[0] for o in rest):.2f} | |")
        print(f"| **all ops** | {sum(v[0] for v in fp32[name].values()):.2f} | "
              f"| {sum(v[0] for v in int8[name].values()):.2f} | |\n")

    call = (f"BATCH = common.timing_batch({str(fp32_dir)!r}, {args.seq_len})\n"
            f"for _ in range({args.iterations + 2}): {common.SERVING_CALL}")
    by_shape = {}
    for impl, shape, ms in common.int8_executions(int8_dir, call):
        by_shape.setdefault((impl, shape), []).append(ms)
    print(f"oneDNN int8 kernels, serving_default, {args.iterations + 2} calls (the first two include setup):\n")
    print("| kernel | shape | calls | fastest ms | median ms | slowest ms |")
    print("|---|---|---|---|---|---|")
    for (impl, shape), times in sorted(by_shape.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {impl} | {shape} | {len(times)} | {min(times):.2f} | {np.median(times):.2f} | {max(times):.2f} |")


if __name__ == "__main__":
    main()
