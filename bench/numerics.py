"""Does the INT8 model compute the same on every CPU? The bundled model, converted and evaluated
under each oneDNN setting this CPU allows.

    python bench/numerics.py

A setting is an environment: the default; TF_ENABLE_ONEDNN_OPTS=1 (TensorFlow's oneDNN graph
rewrites, on by default on CPUs with AVX-512 VNNI, AVX-VNNI or AMX, off elsewhere); and
ONEDNN_MAX_CPU_ISA capped at each instruction set the CPU has (SSE41 up to AMX). Under each,
quantize.py converts the bundled model (--force_int8, so every setting has the same kernels) and
the whole bundled evaluation set is scored against FP32, in a process of its own. Printed per
setting, against the default setting: the largest relative difference of the calibrated
activation ranges and whether the variables (int8 weights, biases, scales) are equal; argmax
agreement and mean KL divergence with FP32; and the largest difference of any int8 kernel's
output, relative to that output's largest value, on 8 passages. The kernels' outputs are dumped
to bench/runs/numerics/<setting>.npz.
"""
import argparse
import json
import subprocess
import sys

import numpy as np

import common
from common import RUNS
from gptj_int8 import cli

OUT = RUNS / "numerics"
# oneDNN's ISA names, each with the CPU flag that allows it
ISAS = [("SSE41", "sse4_1"), ("AVX", "avx"), ("AVX2", "avx2"), ("AVX512_CORE", "avx512f"),
        ("AVX512_CORE_VNNI", "avx512_vnni"), ("AVX512_CORE_AMX", "amx_int8")]


def settings():
    flags = cli.cpu_flags()
    return ([("default", {}), ("onednn-opts", {"TF_ENABLE_ONEDNN_OPTS": "1"})]
            + [(f"isa-{isa}", {"ONEDNN_MAX_CPU_ISA": isa}) for isa, flag in ISAS if flag in flags])


def conversion_differences(reference, other):
    """(largest relative difference of the calibrated activation ranges, whether every variable,
    the int8 weights among them, is equal) between two conversions."""
    import tensorflow as tf
    from gptj_int8 import savedmodel

    def ranges(output_dir):
        graph = savedmodel.read_graph_def(output_dir / "converted_graph_def.pb")
        return {n.name: float(tf.make_ndarray(n.attr["value"].tensor)) for n in graph.node
                if n.op == "Const" and "quantize_u8/" in n.name}

    def variables(model):
        reader = tf.train.load_checkpoint(str(model / "variables" / "variables"))
        return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map() if "OBJECT_GRAPH" not in k}

    a, b = ranges(reference[1]), ranges(other[1])
    diff = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in a)
    va, vb = variables(reference[0]), variables(other[0])
    return diff, va.keys() == vb.keys() and all(np.array_equal(va[k], vb[k]) for k in va)


def worker(fp32_dir, int8_dir, dump):
    """Score both models on the evaluation set, and dump the int8 kernels' outputs on 8 passages."""
    import tensorflow as tf
    from gptj_int8 import benchmark, data, int8_matmul, models, savedmodel
    tok = models.load_tokenizer(fp32_dir)
    seqs = data.encode_passages(tok, data.load_passages(data.EVALUATION_SET), models.context_length(fp32_dir))
    batches = data.batches(seqs, 8, tok.pad_token_id)
    for d in (fp32_dir, int8_dir):
        common.check_memory(d, signatures=["serving_default"])
    logits = [benchmark.evaluate(tf.saved_model.load(str(d)).signatures["serving_default"], batches, str(d))[0]
              for d in (fp32_dir, int8_dir)]
    loaded, functions = savedmodel.load_signatures(int8_dir)
    graph = savedmodel.extract_serving_graph(loaded, functions["serving_default"])
    kernels = sorted(int8_matmul.kernel_output(n) for n in graph.graph_def.node
                     if n.op in int8_matmul.KERNEL_OPS.values())
    outputs = graph.function(fetches=kernels)(*map(tf.constant, batches[0][:2]))
    np.savez(dump, **{k.replace("/", "|"): v.numpy() for k, v in zip(kernels, outputs)})
    print(json.dumps({"agreement": benchmark.argmax_agreement(*logits),
                      "kl": benchmark.mean_kl_divergence(*logits)}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", nargs=3, metavar=("FP32", "INT8", "DUMP"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(*args.worker)

    fp32_dir = common.prepare("bundled-gptj-kjv")
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, env in settings():
        int8_dir = OUT / f"converted_{name}"
        common.check(common.script("quantize.py", "--input_model", fp32_dir, "--converted_model", int8_dir,
                                   "--output_dir", OUT / f"output_{name}", "--force_int8", "--overwrite",
                                   cwd=RUNS, extra_env=env), f"quantize under {name}")
        proc = subprocess.run([sys.executable, __file__, "--worker", str(fp32_dir), str(int8_dir),
                               str(OUT / f"{name}.npz")], capture_output=True, text=True,
                              env=common.script_env(env))
        if proc.returncode:
            raise SystemExit(f"evaluation under {name} failed:\n{proc.stderr[-2000:]}")
        rows.append((name, env, (int8_dir, OUT / f"output_{name}"), json.loads(proc.stdout.splitlines()[-1])))

    reference = np.load(OUT / "default.npz")
    print(f"\nCPU: {cli.cpu_name()}\n")
    print("| setting | calibrated ranges vs default | variables vs default | agreement with FP32 | KL "
          "| int8 kernels' outputs vs default |")
    print("|---|---|---|---|---|---|")
    for name, env, conversion, result in rows:
        dumped = np.load(OUT / f"{name}.npz")
        diff = max(float(np.abs(dumped[k] - reference[k]).max() / (np.abs(reference[k]).max() + 1e-12))
                   for k in reference.files)
        range_diff, same_variables = conversion_differences(rows[0][2], conversion)
        label = " ".join(f"{k}={v}" for k, v in env.items()) or "default"
        print(f"| {label} | {range_diff:.1e} | {'equal' if same_variables else 'differ'} "
              f"| {result['agreement'] * 100:.2f}% | {result['kl']:.5f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
