"""Int8 numbers: activation ranges, weights quantized in blocks, the compensated int32 bias, and
one store of int8 variables, so every signature of a model reads the same int8 copy of a weight."""
import numpy as np
import tensorflow as tf

from .graph import Rewriter, make_const, make_node


# Activations use 128 of the u8 levels on every CPU, so that a converted model computes the same
# on every CPU it is run on: without VNNI, oneDNN's u8 x s8 kernels add pairs of products in int16
# (vpmaddubsw), which saturates once 2 * 255 * 127 > 32767; 2 * 127 * 127 fits.
ACTIVATION_LEVELS = 128


def activation_range(lo, hi):
    """A calibrated range that holds zero and is never empty."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < 1e-6:
        hi = lo + 1e-6
    return lo, hi


def u8_activation_range(lo, hi):
    """The (min, max) to give QuantizeV2 (quint8, MIN_FIRST) so that [lo, hi] takes
    ACTIVATION_LEVELS levels and zero is a level: the zero point is a whole number.

    TensorFlow's own QuantizeV2 rounds x * scale and the zero point apart; the oneDNN one it
    runs when TF_ENABLE_ONEDNN_OPTS is on (the default on CPUs with AVX-512 VNNI or AMX) rounds
    their sum. They agree only when the zero point is whole; the int8 bias compensates a whole one."""
    lo, hi = activation_range(lo, hi)
    step = (hi - lo) / (ACTIVATION_LEVELS - 1)
    zero = min(max(round(-lo / step), 0), ACTIVATION_LEVELS - 1)
    lo = -zero * step
    return lo, lo + 255 * step


def _row_blocks(w, block_elements=1 << 24):
    """(start, stop) of blocks of rows of `w` holding at most `block_elements` values each."""
    rows = max(1, block_elements // max(1, int(np.prod(w.shape[1:]))))
    return [(i, min(i + rows, w.shape[0])) for i in range(0, w.shape[0], rows)]


def _read(w, i, j):
    return np.asarray(w[i:j], np.float32)


def absolute_max(w, axis=None, block_elements=1 << 24):
    """max |w| of the whole tensor (axis=None), of each row (axis=1) or of each column (axis=0),
    read in blocks of rows."""
    blocks = _row_blocks(w, block_elements)
    if axis is None:
        return np.float32(max(float(np.abs(_read(w, i, j)).max()) for i, j in blocks))
    if axis == 1:
        return np.concatenate([np.abs(_read(w, i, j)).max(axis=1) for i, j in blocks])
    out = np.zeros(w.shape[1], np.float32)
    for i, j in blocks:
        out = np.maximum(out, np.abs(_read(w, i, j)).max(axis=0))
    return out


def quantize_symmetric(w, axis=None, block_elements=1 << 24):
    """int8 weights in [-127, 127] and the absolute maximum they scale to: one for the whole
    tensor (axis=None), one per row (axis=1, reduced along the row) or one per column (axis=0).

    `w` is a numpy array, a tf.Variable or anything with `.shape` and row slicing, read in blocks
    of rows (64 MB of float32 at most), so a 50400 x 4096 embedding is never copied whole, nor has
    a full-size temporary beside it."""
    absmax = np.maximum(absolute_max(w, axis, block_elements), np.float32(1e-8)).astype(np.float32)
    q = np.empty(w.shape, np.int8)
    for i, j in _row_blocks(w, block_elements):
        if axis is None:
            scale = np.float32(127.0) / absmax
        elif axis == 1:
            scale = np.float32(127.0) / absmax[i:j, None]
        else:
            scale = np.float32(127.0) / absmax[None, :]
        q[i:j] = np.clip(np.rint(_read(w, i, j) * scale), -127, 127)
    return q, absmax


def compensated_int32_bias(bias, column_sums, weight_absmax, lo, hi):
    """The qint32 bias of a u8 (MIN_FIRST) x s8 matmul: the float bias in accumulator units plus
    the activation's zero point times each column's int8 weight sum, which the kernel cannot see.
    `weight_absmax` is one value, or one per column."""
    scale_a = 255.0 / (hi - lo)
    scale_w = 127.0 / np.asarray(weight_absmax, np.float64)
    return np.rint(bias.astype(np.float64) * scale_a * scale_w
                   + column_sums.astype(np.float64) * np.rint(lo * scale_a)).astype(np.int32)


class ScaledRows:
    """A weight whose row k reads multiplied by scale[k], block by block (SmoothQuant)."""

    def __init__(self, weight, scale):
        self.weight, self.scale, self.shape = weight, scale, tuple(weight.shape)

    def __getitem__(self, rows):
        return np.asarray(self.weight[rows], np.float32) * self.scale[rows, None]


class Int8Weights:
    """The int8 variables of one conversion. A weight read by several signatures (serving_default,
    prefill, decode) is quantized once and stored once: the same key gives the same variable.

    The FP32 variables whose ids are in `release` are emptied as soon as their int8 copy exists, so
    a conversion holds each weight once, FP32 or int8 (the caller knows that nothing reads them in
    FP32 afterwards: sites.int8_only_weights)."""

    def __init__(self, per_channel, release=()):
        self.per_channel = per_channel
        self.release = set(release)
        self._made = {}
        self._released = set()

    def _check_not_released(self, w):
        if id(w) in self._released:
            raise RuntimeError(f"{w.name} was released after its int8 copy was made, and is read again")

    def _free(self, variables):
        """Empty the variables to release (their buffers go back to the OS; a later read fails)."""
        for w in variables:
            if id(w) in self.release and id(w) not in self._released:
                tf.raw_ops.AssignVariableOp(resource=w.handle, value=tf.zeros([0], w.dtype), validate_shape=False)
                self._released.add(id(w))

    def matmul(self, graph, sites):
        """The weights of `sites` side by side as one int8 variable [K, sum of N], with the
        absolute maximum each column scales to and each column's int8 sum."""
        key = ("matmul", tuple((id(graph.feeds[s.weight]), None if s.row_scale is None else s.row_scale.tobytes())
                               for s in sites))
        if key not in self._made:
            parts = []
            for site in sites:
                w = graph.feeds[site.weight]
                self._check_not_released(w)
                q, absmax = quantize_symmetric(w if site.row_scale is None else ScaledRows(w, site.row_scale),
                                               axis=0 if self.per_channel else None)
                parts.append((q, np.broadcast_to(absmax, (q.shape[1],))))
            q = parts[0][0] if len(parts) == 1 else np.concatenate([p for p, _ in parts], axis=1)
            absmax = np.concatenate([a for _, a in parts]).astype(np.float32)
            del parts
            name = f"{sites[0].matmul if len(sites) == 1 else sites[0].activation}_int8".replace("/", "_").replace(":", "_")
            self._made[key] = (tf.Variable(q, trainable=False, name=name), absmax,
                               q.sum(axis=0, dtype=np.int64))
            del q
            self._free(graph.feeds[s.weight] for s in sites)
        return self._made[key]

    def embedding(self, table):
        """(int8 table, float32 scale per row) variables of an embedding table."""
        key = ("embedding", id(table))
        if key not in self._made:
            self._check_not_released(table)
            q, absmax = quantize_symmetric(table, axis=1)
            name = table.name.split(":")[0].replace("/", "_")
            self._made[key] = (tf.Variable(q, trainable=False, name=f"{name}_int8"),
                               tf.Variable((absmax / 127.0).astype(np.float32), trainable=False,
                                           name=f"{name}_row_scale"))
            del q
            self._free([table])
        return self._made[key]


def quantize_embeddings(graph, embeddings, store):
    """Embedding tables stored int8 with one scale per row; rows are dequantized after the lookup."""
    rw = Rewriter(graph)
    for gather, holder in embeddings:
        table, row_scale = store.embedding(rw.graph.feeds[holder])
        old = rw.nodes[gather]
        rw.read_variable(f"{gather}/table_int8", table)
        rw.read_variable(f"{gather}/row_scale", row_scale)
        indices = old.input[1]
        attrs = {"batch_dims": old.attr["batch_dims"].i, "validate_indices": old.attr["validate_indices"].b,
                 "Tindices": tf.as_dtype(old.attr["Tindices"].type)}
        rw.add(make_node("ResourceGather", f"{gather}/rows_int8", [f"{gather}/table_int8", indices],
                         dtype=tf.int8, **attrs),
               make_node("ResourceGather", f"{gather}/scales", [f"{gather}/row_scale", indices],
                         dtype=tf.float32, **attrs),
               make_node("Cast", f"{gather}/rows", [f"{gather}/rows_int8"], SrcT=tf.int8, DstT=tf.float32,
                         Truncate=False),
               make_const(f"{gather}/last_axis", -1, tf.int32),
               make_node("ExpandDims", f"{gather}/scales_column", [f"{gather}/scales", f"{gather}/last_axis"],
                         T=tf.float32, Tdim=tf.int32),
               make_node("Mul", gather, [f"{gather}/rows", f"{gather}/scales_column"], T=tf.float32))
    return rw.finish()
