"""How much memory a process needs to serve a SavedModel, and how much this one may use: the checks
that refuse a run, in one line, before it loads a model it cannot hold.

A SavedModel's need is read from its files, never by loading it: the dtype and shape of every
variable from the checkpoint's index, and the size of its graph. And what a process gives back to
the OS between phases: return_freed_memory.
"""
import ctypes
import ctypes.util
import dataclasses
import functools
import gc
import logging
from pathlib import Path

import numpy as np
import psutil

from .cli import UserError
from .generation import DECODE, GENERATE, PREFILL, SERVING

log = logging.getLogger(__name__)

# Peak RSS of a process that loads a SavedModel and calls some of its signatures = RUNTIME_BYTES +
# FLOAT_FACTOR x its float variables + INT8_FACTORS[what it calls] x its int8 variables. The factors
# were measured on this project's machine (TF 2.21) by `python bench/memory.py --only serving`, at
# GPT-J-6B's width with 1, 2 and 3 layers, from what each added layer costs (README, "way of
# serving"): FP32 needs 1.05x its variables whatever is called; INT8 keeps the variable and one
# reordered copy of each int8 weight per signature that runs it (oneDNN's kernels cache per op).
# RUNTIME_BYTES is TensorFlow, transformers and the rest a script imports. Against that run's peaks
# the sum errs high: 4.1 and 5.8 GB for FP32 at 1 and 3 layers (measured 3.58 and 5.27), 3.7 and
# 5.1 GB for INT8's prefill + decode (2.76 and 4.15).
RUNTIME_BYTES = 1.5e9
FLOAT_FACTOR = 1.05
INT8_FACTORS = {
    frozenset({SERVING}): 2.4,                      # measured 2.36x
    frozenset({PREFILL, DECODE}): 3.5,              # 3.44x, generate.py's host loop
    frozenset({GENERATE}): 2.3,                     # 2.26x, the in-graph loop
    frozenset({SERVING, PREFILL, DECODE, GENERATE}): 5.6,  # 5.52x, every signature in one process
}
ALL_SIGNATURES = (SERVING, PREFILL, DECODE, GENERATE)


def gb(n_bytes):
    """Bytes as GB for a message: two decimals below 10 GB (a small model's needs differ there)."""
    value = n_bytes / 1e9
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


# ---------------------------------------------------------------- what a model needs

def weight_bytes(model_dir):
    """(float bytes, int8 bytes) of a SavedModel's variables, from its checkpoint index. A frozen
    graph's weights (INC's models) are constants in saved_model.pb: they count as int8, whose
    factor is the larger."""
    import tensorflow as tf
    model_dir = Path(model_dir)
    float_bytes, int8_bytes = 0, 0
    if (model_dir / "variables" / "variables.index").exists():
        reader = tf.train.load_checkpoint(str(model_dir / "variables" / "variables"))
        shapes = reader.get_variable_to_shape_map()
        for name, dtype in reader.get_variable_to_dtype_map().items():
            if dtype == tf.string:                  # the object graph
                continue
            size = int(np.prod(shapes[name])) * dtype.size
            if dtype in (tf.int8, tf.uint8, tf.qint8, tf.quint8):
                int8_bytes += size
            else:
                float_bytes += size
    graph = next((model_dir / f for f in ("saved_model.pb", "saved_model.pbtxt") if (model_dir / f).exists()), None)
    int8_bytes += graph.stat().st_size if graph else 0
    return float_bytes, int8_bytes


def kind(model_dir):
    """'INT8' for a model with int8 variables, else 'FP32'."""
    import tensorflow as tf
    index = Path(model_dir) / "variables" / "variables"
    if not index.with_suffix(".index").exists():
        return "INT8"                               # a frozen graph: INC's
    dtypes = tf.train.load_checkpoint(str(index)).get_variable_to_dtype_map().values()
    return "INT8" if tf.int8 in dtypes else "FP32"


def int8_factor(signatures):
    """INT8_FACTORS of the smallest measured set of signatures that holds `signatures`."""
    covering = [f for names, f in INT8_FACTORS.items() if set(signatures) <= names]
    return min(covering) if covering else max(INT8_FACTORS.values())


def model_need(model_dir, signatures):
    """Bytes a SavedModel adds to a process that loads it and calls `signatures` (no runtime)."""
    float_bytes, int8_bytes = weight_bytes(model_dir)
    return FLOAT_FACTOR * float_bytes + int8_factor(signatures) * int8_bytes


def serving_need(model_dir, signatures):
    """Bytes a process needs to load a SavedModel and call those signatures."""
    return RUNTIME_BYTES + model_need(model_dir, signatures)


def logits_bytes(batch_tokens, vocab):
    """A scoring batch's logits ([batch, seq, vocab] float32) held twice: the graph's output and what
    is read of it. Not measured: the serving figures above are at batch 1 and 32 tokens."""
    return 2 * batch_tokens * vocab * 4


# ---------------------------------------------------------------- what this process may use

def _cgroup_memory_left():
    """Bytes this process's cgroup (v2) may still allocate, or None without a limit."""
    try:
        cgroup = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        folder = Path("/sys/fs/cgroup") / cgroup.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((folder / "memory.current").read_text())
    except (OSError, IndexError, ValueError):
        return None


def memory_limit(max_memory_gb=None):
    """(bytes this run may use, what sets it): what the OS reports available (plus what this process
    holds already), within the cgroup's limit and `max_memory_gb` (a user's own cap, e.g. on a
    machine shared with other jobs)."""
    candidates = [(psutil.virtual_memory().available + psutil.Process().memory_info().rss,
                   "what the OS reports available"),
                  (_cgroup_memory_left(), "the cgroup's memory limit")]
    if max_memory_gb is not None:
        candidates.append((max_memory_gb * 1e9, f"--max_memory_gb {max_memory_gb:g}"))
    return min((c for c in candidates if c[0] is not None), key=lambda c: c[0])


def available_memory(max_memory_gb=None):
    """Bytes this run may use (memory_limit's)."""
    return memory_limit(max_memory_gb)[0]


def check_fits(model_dirs, signatures=ALL_SIGNATURES, max_memory_gb=None, extra_bytes=0, consequence=""):
    """Refuse, in one line with the numbers, to load these SavedModels together in this process
    and call `signatures` on each."""
    model_dirs = [Path(d) for d in model_dirs]
    need, _ = needs(dict(enumerate(model_dirs)), [(signatures, extra_bytes)])
    have, source = memory_limit(max_memory_gb)
    if need > have:
        what = (f"the {kind(model_dirs[0])} model {model_dirs[0]} needs" if len(model_dirs) == 1 else
                f"the models {', '.join(map(str, model_dirs))} need")
        raise UserError(f"{what} {gb(need)} GB and {gb(have)} GB is available ({source})"
                        + (f": {consequence}" if consequence else ""))
    return need


# ---------------------------------------------------------------- what this process gives back

@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None under another C library."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def return_freed_memory():
    """Free what only reference cycles hold (TensorFlow's traced functions, each with its graph),
    then give the OS back what the C heap holds free: glibc keeps the freed pieces of smaller
    tensors (under its 32 MB mmap threshold) for reuse, and they count in the RSS that a machine
    runs out of. Before quantize.py's peak at GPT-J-6B's width, 0.06-0.14 GB."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------- two models, together or one at a time

INTERLEAVED, ONE_AT_A_TIME = "interleaved", "one at a time"


@dataclasses.dataclass
class Plan:
    """How a run of two models goes: both loaded together (their calls interleaved), or one at a time."""
    timing: str
    together: float          # bytes both models need in one process
    alone: dict              # label -> bytes each needs on its own
    available: float
    source: str              # what sets `available`

    def summary(self):
        return {"available_gb": self.available / 1e9, "limit": self.source,
                "together_gb": self.together / 1e9, "alone_gb": {k: v / 1e9 for k, v in self.alone.items()}}


def needs(models, phases):
    """(bytes both models need together, {label: bytes each needs alone}) for a run that goes through
    `phases` ([(signatures, extra bytes)]) with the models of `models` ({label: SavedModel}) loaded
    afresh for each phase: a phase's need is the runtime, its extra bytes and each model's need for
    its signatures, and a run needs its largest phase."""
    together = max(RUNTIME_BYTES + extra + sum(model_need(d, sigs) for d in models.values()) for sigs, extra in phases)
    alone = {label: max(RUNTIME_BYTES + extra + model_need(d, sigs) for sigs, extra in phases)
             for label, d in models.items()}
    return together, alone


def scoring_need(model_dirs, signatures, extra_bytes, processes, copies=None):
    """Bytes a local scoring pipeline needs for these models: this process's runtime, and each worker
    process's runtime, batch (`extra_bytes`) and models (processes 0: the workers are this process's
    threads, sharing one copy of each model); with `copies`, the models live in that many processes
    of their own, shared by the workers (Beam's large-model mode)."""
    models = sum(model_need(d, signatures) for d in model_dirs)
    if copies:
        return RUNTIME_BYTES + processes * (RUNTIME_BYTES + extra_bytes) + copies * (RUNTIME_BYTES + models)
    if not processes:
        return RUNTIME_BYTES + extra_bytes + models
    return RUNTIME_BYTES + processes * (RUNTIME_BYTES + extra_bytes + models)


def plan(models, phases, max_memory_gb=None):
    """The Plan of a two-model run (needs' arguments), or UserError when one model alone cannot fit."""
    together, alone = needs(models, phases)
    have, source = memory_limit(max_memory_gb)
    both = " and ".join(models)
    if together <= have:
        log.info("%s need %s GB together, %s GB is available (%s): both loaded, timed interleaved",
                 both, gb(together), gb(have), source)
        return Plan(INTERLEAVED, together, alone, have, source)
    label, most = max(alone.items(), key=lambda item: item[1])
    if most > have:
        raise UserError(f"the {label} model needs {gb(most)} GB and {gb(have)} GB is available ({source}): "
                        f"it cannot be loaded even on its own")
    log.info("%s need %s GB together and %s GB is available (%s): one at a time, %s GB at most",
             both, gb(together), gb(have), source, gb(most))
    return Plan(ONE_AT_A_TIME, together, alone, have, source)
