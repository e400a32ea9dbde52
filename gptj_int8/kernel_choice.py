"""Performance-aware conversion: the MatMuls that read one activation become an int8 kernel only
where, timed on the CPU that converts, the kernel is faster than they are in FP32, and in the
form (int8_matmul.FORMS: oneDNN's inner product or its 1x1 convolution) that is fastest there.

A group (the MatMuls `fuse_int8_matmuls` would merge) is timed at the rows it reads in its
signature (a passage's tokens in serving_default and prefill; one row in decode, and at the lm_head
of prefill), on the model's own weights: its FP32 MatMuls (+ BiasAdds) on random activations
against each form of what replaces them, QuantizeV2 + the int8 kernel (+ its split), built by the
converter itself. Timing adds no FP32 copy of a weight, only the group's int8 one while it is timed.
Groups of one shape are timed once. Which pays depends on the CPU (AVX2, VNNI, AMX) and on the
shape: at one row oneDNN's int8 inner product can be slower than FP32 on AVX2, where the
convolution streams the weight at memory bandwidth.
"""
import dataclasses
import gc
import logging

import numpy as np
import tensorflow as tf

from . import benchmark, int8_matmul, savedmodel, sites, weights

log = logging.getLogger(__name__)

# int8 is kept unless it is slower than FP32 by more than this share: ties within the timing's
# noise go to int8, which is a quarter of the size (an FP32 MatMul keeps its FP32 weight); and
# between int8 forms, to the simpler graph (the inner product, one op) unless another form is
# faster by more than it.
TIE_MARGIN = 0.05
# ... and by more than this share where another signature already reads the weight in int8: FP32
# there would store a second copy of it, four times the size of the first.
COPY_MARGIN = 0.25

# Timing frees a group's int8 copies as soon as it is done with them when they hold at least this
# many values (16 MB): GPT-J-6B's smallest weight holds 16M.
LARGE_WEIGHT_VALUES = 1 << 24


@dataclasses.dataclass(frozen=True)
class GroupShape:
    rows: int          # M: rows of the activation
    depth: int         # K
    widths: tuple      # N of each MatMul
    biases: tuple      # whether each MatMul has a BiasAdd

    def __str__(self):
        n = f"{self.widths[0]}" if len(self.widths) == 1 else "+".join(map(str, self.widths))
        return f"{self.rows} x {self.depth} @ {self.depth} x {n}"


FP32 = "fp32"


@dataclasses.dataclass(frozen=True)
class Timing:
    fp32_ms: float
    int8_ms: dict      # {form: ms}, a form of int8_matmul.FORMS each

    def fastest_form(self):
        """The int8 form to use: the first of int8_matmul.FORMS timed (the simplest graph) unless
        another is faster than it by more than TIE_MARGIN."""
        forms = [f for f in int8_matmul.FORMS if f in self.int8_ms]
        best = min(forms, key=self.int8_ms.get)
        return best if self.int8_ms[best] * (1 + TIE_MARGIN) < self.int8_ms[forms[0]] else forms[0]

    def choice(self, margin=TIE_MARGIN):
        """FP32 or the int8 form to use: int8 unless its fastest form is slower than FP32 by more
        than `margin` (ties go to int8, the smaller model)."""
        form = self.fastest_form()
        return form if self.int8_ms[form] <= self.fp32_ms * (1 + margin) else FP32

    def __str__(self):
        return ", ".join([f"FP32 {self.fp32_ms:.3f} ms"] + [f"int8 {f} {ms:.3f} ms" for f, ms in self.int8_ms.items()])


def group_shape(graph, group, rows):
    return GroupShape(rows, int(graph.feeds[group[0].weight].shape[0]),
                      tuple(int(graph.feeds[s.weight].shape[1]) for s in group),
                      tuple(s.bias is not None for s in group))


def time_group(shape, per_channel=True, forms=int8_matmul.FORMS, weights_and_biases=None, warmup=2,
               budget_s=0.25, seed=0):
    """Median ms per call of the group's FP32 MatMuls and of each int8 form that would replace
    them, each form called in turn with FP32 (after `warmup` calls) for about `budget_s` seconds in
    all, at least 5 times each; on `weights_and_biases`, the group's own (weight, bias or None)
    variables, or on random ones of its shape."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((shape.rows, shape.depth), np.float32)
    if weights_and_biases is None:
        weights_and_biases = [(rng.standard_normal((shape.depth, n), np.float32) * np.float32(0.02),
                               rng.standard_normal(n, np.float32) * np.float32(0.1) if b else None)
                              for n, b in zip(shape.widths, shape.biases)]
    graph = savedmodel.matmul_graph(x, [w for w, _ in weights_and_biases], [b for _, b in weights_and_biases])
    del weights_and_biases   # random ones were copied into variables
    found, store = sites.find_matmul_sites(graph), weights.Int8Weights(per_channel)
    ranges = {"x": (float(x.min()), float(x.max()))}
    fp32, dummy = graph.serving_fn(), [(np.zeros([1, 1], np.int32),) * 2]
    fp32_seconds, int8_ms = [], {}
    large = shape.depth * sum(shape.widths) >= LARGE_WEIGHT_VALUES
    for form in forms:
        # one form at a time: each kernel keeps its own reordered copy of the int8 weight, which beside
        # the model's FP32 weights would raise the conversion's peak
        fns = [fp32, int8_matmul.fuse_int8_matmuls(graph.copy(), found, ranges, store, form).serving_fn()]
        first = benchmark.time_models(fns, dummy, warmup, 1, progress=False)
        calls = int(np.clip(budget_s / len(forms) / max(sum(t[0] for t in first), 1e-6), 5, 500))
        seconds = benchmark.time_models(fns, dummy, 0, calls, progress=False)
        fp32_seconds += list(seconds[0])
        int8_ms[form] = float(np.median(seconds[1]) * 1000)
        # the kernel's function holds its reordered weight in reference cycles: free it now, where
        # that weight matters (a collection takes a third of a second)
        del fns
        if large:
            gc.collect()
    del graph, store, fp32   # and the int8 weight, before the next group's
    if large:
        gc.collect()
    return Timing(float(np.median(fp32_seconds) * 1000), int8_ms)


def choose_kernels(graph, found, rows, timings, int8_weights=frozenset(), per_channel=True,
                   forms=int8_matmul.FORMS, timer=None):
    """{activation: (form, group, shape, timing)} for the groups of `found` (the sites of one
    signature's `graph`): FP32 or the int8 form of `forms` that Timing.choice picks, with
    COPY_MARGIN instead of TIE_MARGIN when one of the group's weights (sites.weight_key) is in
    `int8_weights`, read in int8 by another signature. `rows` maps each activation to its row
    count; `timings` ({GroupShape: Timing}) is filled and reused across signatures."""
    chosen = {}
    for activation, group in int8_matmul.kernel_groups(graph, found).items():
        shape = group_shape(graph, group, rows[activation])
        if shape not in timings:
            own = [(graph.feeds[s.weight], graph.feeds[s.bias] if s.bias else None) for s in group]
            timings[shape] = (timer or time_group)(shape, per_channel, forms, own)
            log.info("timed %s: %s -> %s", shape, timings[shape], timings[shape].choice())
        copy = any(sites.weight_key(graph, s) in int8_weights for s in group)
        chosen[activation] = (timings[shape].choice(COPY_MARGIN if copy else TIE_MARGIN), group, shape, timings[shape])
    return chosen


def given_kernels(graph, found, rows, choose):
    """choose_kernels' answer where the choice is given, not timed: `choose(layer names, GroupShape)`
    returns FP32 or a form for each group (tests build any CPU's choices on every CPU this way)."""
    return {activation: (choose([sites.module_name(graph, s) for s in group], shape), group, shape, None)
            for activation, group in int8_matmul.kernel_groups(graph, found).items()
            for shape in [group_shape(graph, group, rows[activation])]}


def time_steps(graphs, inputs, warmup=2, budget_s=1.0):
    """Median ms per call of each graph's whole step (ServingGraphs of one signature, called on
    `inputs`, a tuple in the order of their inputs), called in turn, at least 3 times each and for
    about `budget_s` seconds in all."""
    fns = [g.function() for g in graphs]

    def call(fn, batch):
        fn(*map(tf.constant, batch))

    first = benchmark.time_models(fns, [inputs], warmup, 1, progress=False, call=call)
    calls = int(np.clip(budget_s / max(sum(t[0] for t in first), 1e-6), 3, 200))
    seconds = benchmark.time_models(fns, [inputs], 0, calls, progress=False, call=call)
    return [float(np.median(s) * 1000) for s in seconds]
