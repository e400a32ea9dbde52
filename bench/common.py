"""What both benches do: build models with the project's own scripts, and compare two SavedModels."""
import collections
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RUNS = REPO / "bench" / "runs"
# GPT-J-6B's shape (GPTJConfig's defaults) with fewer layers.
GPTJ_6B_WIDTH = "n_embd=4096,n_head=16,rotary_dim=64,n_inner=16384,vocab_size=50400"
GPTJ_6B_LAYERS = 28


def script_env(extra_env=None):
    return dict(os.environ, PYTHONPATH=str(REPO), **(extra_env or {}))


def script(name, *args, extra_env=None, **popen):
    """Start one of the project's scripts as a user would run it (with `extra_env` set)."""
    return subprocess.Popen([sys.executable, str(REPO / name), *map(str, args)], env=script_env(extra_env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)


def script_peak(name, *args, extra_env=None):
    """(peak RSS in GB, seconds) of one run of one of the project's scripts (with `extra_env` set)."""
    start = time.perf_counter()
    proc = script(name, *args, extra_env=extra_env, cwd=RUNS)
    peak = poll_peak_rss(proc)
    check(proc, f"{name} {' '.join(map(str, args))}")
    return peak / 1e9, time.perf_counter() - start


def poll_peak_rss(proc):
    """Peak RSS in bytes of a running process and its children, polled until it ends. (A child's
    own ru_maxrss is no measure: it keeps the RSS of the parent it was forked from.)"""
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)]))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return peak


def cpu_name():
    """The CPU's model name and which of the int8 instruction sets that change oneDNN's kernels it has."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return f"{model} ({', '.join(('' if f in flags else 'no ') + f for f in ('avx512_vnni', 'amx_int8'))})"


def check(proc, what):
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{err[-2000:]}")


def prepare(name, n_layer=None):
    """FP32 SavedModel: GPT-J-6B's width with `n_layer` random layers, or the bundled model."""
    out = RUNS / name
    if not (out / "saved_model.pb").exists():
        RUNS.mkdir(parents=True, exist_ok=True)
        if n_layer is None:
            check(script("prepare_model.py", "--output_dir", out, "--overwrite", cwd=RUNS), "prepare " + name)
        else:
            check(script("prepare_model.py", "--random_init", "--config_overrides",
                         f"{GPTJ_6B_WIDTH},n_layer={n_layer}", "--output_dir", out, "--overwrite", cwd=RUNS),
                  "prepare " + name)
    return out


def check_memory(*model_dirs, signatures=None):
    """Exit with one line, before loading them, when these SavedModels cannot be held together here
    (gptj_int8.memory's estimate; every signature called when `signatures` is None)."""
    from gptj_int8 import memory
    from gptj_int8.cli import UserError
    try:
        memory.check_fits(model_dirs, signatures or memory.ALL_SIGNATURES, consequence="not loading it here")
    except UserError as e:
        raise SystemExit(f"error: {e}")


def timing_batch(model_dir, seq_len=128):
    """One (input_ids, attention_mask) of `seq_len` real tokens from the bundled passages."""
    from gptj_int8 import data, models
    tok = models.load_tokenizer(model_dir)
    ids = [t for text in data.load_passages(data.EVALUATION_SET, 40) for t in tok(text)["input_ids"]][:seq_len]
    return data.pad_batch([ids], tok.pad_token_id)


def token_windows(model_dir, n, length, start=0):
    """`n` prompts of `length` real tokens, cut one after another from the bundled passages."""
    from gptj_int8 import data, models
    tok = models.load_tokenizer(model_dir)
    ids = [t for text in data.load_passages(data.EVALUATION_SET, 400) for t in tok(text)["input_ids"]]
    return [ids[start + i * length:start + (i + 1) * length] for i in range(n)]


def fidelity(fp32_fn, int8_fn, batch):
    """Logit cosine and argmax agreement over every position of `batch`."""
    import tensorflow as tf
    from gptj_int8 import benchmark
    feed = dict(input_ids=tf.constant(batch[0]), attention_mask=tf.constant(batch[1]))
    a, b = fp32_fn(**feed)["logits"].numpy(), int8_fn(**feed)["logits"].numpy()
    return benchmark.logit_cosine(a, b), benchmark.argmax_agreement(a, b)


def size_gb(path):
    from gptj_int8 import savedmodel
    return savedmodel.saved_model_size(path) / 1e9


def seconds_per_call(call, iterations):
    """Seconds of each of `iterations` calls of `call`, after one untimed call."""
    call()
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def median_ms(seconds):
    return float(np.median(seconds) * 1000)


def converted(name, fresh=False):
    """The INT8 SavedModel of bench/runs/<name>, converted by quantize.py (again with `fresh`)."""
    out = RUNS / f"converted_{name}"
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    if not (out / "saved_model.pb").exists():
        check(script("quantize.py", "--input_model", RUNS / name, "--converted_model", out,
                     "--output_dir", RUNS / f"output_{name}", "--calib_samples", "32", cwd=RUNS),
              "quantize " + name)
    return out


# Python run by int8_executions, with MODEL the SavedModel and BATCH a timing batch.
SERVING_CALL = "f = m.signatures['serving_default']; f(input_ids=tf.constant(BATCH[0]), attention_mask=tf.constant(BATCH[1]))"
DECODE_CALL = ("ids = BATCH[0][:, :32]\n"
               "for _ in generation.stream(m.signatures['prefill'], m.signatures['decode'], ids, np.ones_like(ids), 3): pass")


def model_code(model_dir, body):
    """Python for a process of its own: load the SavedModel `model_dir` as `m` (with numpy as np,
    tensorflow as tf, gptj_int8's generation and this folder's common imported), then run `body`."""
    check_memory(model_dir)
    return (f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r})\n"
            "import gptj_int8, common, numpy as np, tensorflow as tf\n"
            "from gptj_int8 import generation\n"
            f"m = tf.saved_model.load({str(model_dir)!r})\n" + body)


def peak_rss_gb_of(code, what):
    """Peak RSS in GB of a Python process running `code` (`what` names it if it fails)."""
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=script_env())
    peak = poll_peak_rss(proc)
    check(proc, what)
    return peak / 1e9


def int8_executions(model_dir, call):
    """The int8 matmuls oneDNN reports while `call` runs on the model: [(implementation, shape, ms)]."""
    code = model_code(model_dir, f"BATCH = common.timing_batch({str(model_dir)!r})\n" + call)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "ONEDNN_VERBOSE": "1", "PYTHONPATH": str(REPO)}).stdout
    found = []
    for line in out.splitlines():
        if line.startswith("onednn_verbose") and ",exec," in line and "src:u8" in line and "wei:s8" in line:
            fields = line.split(",")
            found.append((fields[6], fields[-2], float(fields[-1])))
    return found


def one_row(shape):
    """Whether a oneDNN shape string is an int8 kernel on one row: the inner product's `mb1ic...`,
    or the 1x1 convolution's, whose rows are the image's width (`..._iw1ow1...`)."""
    return shape.startswith("mb1ic") or (shape.startswith("mb1_") and "_iw1ow1" in shape)


def int8_kernels(model_dir, call):
    """{(implementation, shape): count} of int8_executions."""
    return collections.Counter((impl, shape) for impl, shape, _ in int8_executions(model_dir, call))


def count_by_impl(kernels):
    counts = collections.Counter()
    for (impl, _), n in kernels.items():
        counts[impl] += n
    return counts


def matmul_times(shapes, m, per_channel=True):
    """Median ms of m x K @ K x N for each (K, N) of `shapes`: TensorFlow's FP32 MatMul and each
    form of the converter's int8 kernel, timed in turn as the converter times them.
    {(K, N): (fp32, {form: int8})}."""
    from gptj_int8 import kernel_choice
    times = {}
    for k, n in shapes:
        t = kernel_choice.time_group(kernel_choice.GroupShape(m, k, (n,), (False,)), per_channel, budget_s=3.0)
        times[(k, n)] = (t.fp32_ms, t.int8_ms)
    return times


def print_matmul_rows(times, fp32_matmuls, int8_matmuls, prefix=""):
    """Markdown rows of matmul_times, then the sums of one layer + lm_head and of one layer, each
    MatMul (K, N, count) of `fp32_matmuls` against each kernel of `int8_matmuls` in its faster form."""
    from gptj_int8.int8_matmul import FORMS
    for (k, n), (a, forms) in times.items():
        best = min(forms.values())
        print(f"| K={k} N={n} | {prefix}{a:.2f} | " + " | ".join(f"{forms[f]:.2f}" for f in FORMS if f in forms)
              + f" | {a / best:.2f}x |")
    fp32 = [times[(k, n)][0] * c for k, n, c in fp32_matmuls]
    int8 = {f: [times[(k, n)][1][f] * c for k, n, c in int8_matmuls] for f in times[next(iter(times))][1]}
    best = [min(times[(k, n)][1].values()) * c for k, n, c in int8_matmuls]
    for label, cut in (("one layer + lm_head, as each model runs them", None), ("one layer without the lm_head", -1)):
        a, b = sum(fp32[:cut]), sum(best[:cut])
        print(f"| {label} | {prefix}{a:.2f} | " + " | ".join(f"{sum(int8[f][:cut]):.2f}" for f in FORMS if f in int8)
              + f" | {a / b:.2f}x |")
