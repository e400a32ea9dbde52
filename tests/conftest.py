"""Shared fixtures: a tiny random GPT-J exported by prepare_model.py, converted once per flag set."""
import contextlib
import gc
import io
import logging
import os
import runpy
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("USE_TF", "AUTO")   # one process runs every script, prepare_model.py's PyTorch path included

TINY_CONFIG = "vocab_size=4096,n_layer=2,n_embd=64,n_head=4,rotary_dim=8,n_inner=256,n_positions=256"
# The fused sets force int8 kernels everywhere, so that the graphs' structure does not depend on
# which kernels pay on the CPU that runs the tests; "timed" is the default, performance-aware path.
FLAG_SETS = {"fused": ["--force_int8"], "itex": ["--itex_mode"], "fused+perf": ["--performance_only", "--force_int8"],
             "itex+perf": ["--itex_mode", "--performance_only"]}
CONVERSIONS = {**FLAG_SETS, "timed": []}
# quantize.py's flags for every tiny conversion besides the flag set
CONVERSION_ARGS = ["--calib_samples", "16"]


def pytest_collection_finish(session):
    """What the test modules imported (TensorFlow, transformers, the project) lives as long as the
    process: out of the garbage collector's sight, each collection (after every in-process script,
    and the converter's own) takes milliseconds instead of a third of a second."""
    gc.collect()
    gc.freeze()


def run_script(script, *args, cwd, check=True, fresh_process=False):
    """Run one of the project's scripts with these arguments, as `python <script> <args>` in cwd would;
    returns a CompletedProcess (returncode, stdout, stderr).

    By default the script runs inside the test process: its own __main__ block, argv, cwd, stdout,
    stderr and root logger, restored afterwards. That saves the 10-15 s each new process spends
    importing TensorFlow and transformers, which was most of the suite's time. fresh_process=True runs
    it as a new Python process instead, for what only a process shows (signals, what reaches the
    terminal) or for code that changes process-wide state (Intel Neural Compressor)."""
    argv = [str(REPO / script), *map(str, args)]
    if fresh_process:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=900)
    else:
        proc = _run_in_process(argv, cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _run_in_process(argv, cwd, main=None):
    """A command's `main` (default: the script argv[0] as __main__) in this process, with its argv,
    cwd, stdout, stderr, root logger, absl verbosity and signal handlers set for it and restored."""
    from absl import logging as absl_logging
    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    argv_before, path_before, cwd_before = sys.argv, list(sys.path), os.getcwd()
    handlers_before, level_before, verbosity_before = root.handlers[:], root.level, absl_logging.get_verbosity()
    signals_before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    returncode = 0
    try:
        sys.argv = argv
        sys.path.insert(0, str(Path(argv[0]).parent))
        os.chdir(cwd)
        root.handlers = []                 # so the script's logging.basicConfig writes to its stderr
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if main:
                    main()
                else:
                    runpy.run_path(argv[0], run_name="__main__")
            except SystemExit as e:
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
                returncode = 1 if isinstance(e.code, str) else (e.code or 0)
            except BaseException:
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv, sys.path[:] = argv_before, path_before
        os.chdir(cwd_before)
        root.handlers, root.level = handlers_before, level_before
        absl_logging.set_verbosity(verbosity_before)
        for signum, handler in signals_before.items():
            signal.signal(signum, handler)
        gc.collect()                       # the script's models, before the next test loads its own
    return subprocess.CompletedProcess(argv, returncode, out.getvalue(), err.getvalue())


def saved_model_cli_run(model, signature, input_exprs):
    """`saved_model_cli run` on one signature, as a TF Serving user would try a model; its stdout.
    TensorFlow's own command-line main runs inside the test process (a new one would spend most of
    its 9 s importing TensorFlow)."""
    from tensorflow.python.tools import saved_model_cli
    proc = _run_in_process(["saved_model_cli", "run", "--dir", str(model), "--tag_set", "serve",
                            "--signature_def", signature, "--input_exprs", input_exprs], os.getcwd(),
                           main=saved_model_cli.main)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def tiny_fp32(workdir):
    """FP32 SavedModel of a random 2-layer GPT-J with the bundled tokenizer."""
    out = workdir / "tiny-gptj"
    run_script("prepare_model.py", "--random_init", "--config_overrides", TINY_CONFIG, "--seed", "0",
               "--tokenizer", REPO / "models" / "gptj-kjv", "--output_dir", out, cwd=workdir)
    return out


_converted = {}


def convert_tiny(name, workdir, tiny_fp32):
    """(flag set name, converted SavedModel, its output_dir), converted by quantize.py once per session."""
    if name not in _converted:
        out_dir = workdir / f"output-{name}"
        model = workdir / f"converted-{name}"
        run_script("quantize.py", "--input_model", tiny_fp32, "--converted_model", model,
                   "--output_dir", out_dir, *CONVERSION_ARGS, *CONVERSIONS[name], cwd=workdir)
        _converted[name] = (name, model, out_dir)
    return _converted[name]


@pytest.fixture(scope="session", params=list(FLAG_SETS))
def converted(request, workdir, tiny_fp32):
    """The tiny model converted with each flag set in turn."""
    return convert_tiny(request.param, workdir, tiny_fp32)


@pytest.fixture(scope="session")
def converted_fused(workdir, tiny_fp32):
    """The tiny model converted with int8 kernels everywhere (--force_int8)."""
    return convert_tiny("fused", workdir, tiny_fp32)


@pytest.fixture(scope="session")
def converted_timed(workdir, tiny_fp32):
    """The tiny model converted with the default flags: int8 only where it is faster on this CPU."""
    return convert_tiny("timed", workdir, tiny_fp32)


# run_benchmark.py's flags for the tiny model: every block of its output at the least work
BENCHMARK_ARGS = ["--num_samples", "20", "--batch_size", "2", "--warmup", "1", "--iterations", "3",
                  "--gen_samples", "3", "--max_new_tokens", "4"]


@pytest.fixture(scope="session")
def benchmarked(workdir, tiny_fp32, converted_fused):
    """(run_benchmark.py's CompletedProcess, its output_dir) on the tiny model and its fused conversion."""
    out_dir = workdir / "benchmark-fused"
    proc = run_script("run_benchmark.py", "--input_model", tiny_fp32, "--converted_model", converted_fused[1],
                      "--output_dir", out_dir, *BENCHMARK_ARGS, cwd=workdir)
    return proc, out_dir


@pytest.fixture(scope="session")
def bundled_fp32(workdir):
    """The bundled trained model exported with prepare_model.py's defaults, as the README's main command does."""
    run_script("prepare_model.py", cwd=workdir)
    return workdir / "gptj-kjv"


_bundled = {}


@pytest.fixture(scope="session")
def bundled_int8(workdir, bundled_fp32):
    """bundled_int8(flag set name): the bundled model converted by quantize.py with quantize.py's
    defaults and that flag set, once per session."""
    def convert(name):
        if name not in _bundled:
            _bundled[name] = workdir / f"converted_gptj-kjv-{name}"
            run_script("quantize.py", "--input_model", bundled_fp32, "--converted_model", _bundled[name],
                       "--output_dir", workdir / f"output-bundled-{name}", *CONVERSIONS[name], cwd=workdir)
        return _bundled[name]
    return convert
