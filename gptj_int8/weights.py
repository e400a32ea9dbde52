"""Int8 numbers: activation ranges, weights quantized in blocks, the compensated int32 bias, and
one store of int8 variables, so every signature of a model reads the same int8 copy of a weight."""
import numpy as np
import tensorflow as tf

from .graph import Rewriter, make_const, make_node
from .memory import return_freed_memory


# Activations use 128 of the u8 levels on every CPU, so that a converted model computes the same
# on every CPU it is run on: without VNNI, oneDNN's u8 x s8 kernels add pairs of products in int16
# (vpmaddubsw), which saturates once 2 * 255 * 127 > 32767; 2 * 127 * 127 fits.
ACTIVATION_LEVELS = 128


# A table of this many values (64 MB in FP32) or more has what the phases before it freed given back
# to the OS before its int8 copy is made; below it, that gains less than the garbage collection costs
# (a third of a second).
LARGE_TABLE_VALUES = 1 << 24


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


def _row_blocks(w, block_elements=1 << 22):
    """(start, stop) of blocks of rows of `w` holding at most `block_elements` values each."""
    rows = max(1, block_elements // max(1, int(np.prod(w.shape[1:]))))
    return [(i, min(i + rows, w.shape[0])) for i in range(0, w.shape[0], rows)]


def _read(w, i, j):
    """Rows i:j of `w` as a float32 array of its own, to be changed in place."""
    if isinstance(w, tf.Variable):
        _plain_reads(w)
    return np.array(w[i:j], np.float32)


def absolute_max(w, axis=None, block_elements=1 << 22):
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


def quantized_blocks(w, axis=None, block_elements=1 << 22):
    """(absolute maximum, blocks): the int8 weights in [-127, 127] of `w`, as (start, stop, int8
    rows) made one block of rows at a time by iterating `blocks`, and the absolute maximum they
    scale to: one for the whole tensor (axis=None), one per row (axis=1, reduced along the row) or
    one per column (axis=0).

    `w` is a numpy array, a tf.Variable or anything with `.shape` and row slicing, read in blocks
    of rows (16 MB of float32 at most), so a 50400 x 4096 embedding is never copied whole, nor has
    a full-size temporary beside it."""
    absmax = np.maximum(absolute_max(w, axis, block_elements), np.float32(1e-8)).astype(np.float32)

    def blocks():
        for i, j in _row_blocks(w, block_elements):
            if axis is None:
                scale = np.float32(127.0) / absmax
            elif axis == 1:
                scale = np.float32(127.0) / absmax[i:j, None]
            else:
                scale = np.float32(127.0) / absmax[None, :]
            block = _read(w, i, j)
            np.multiply(block, scale, out=block)
            np.rint(block, out=block)
            yield i, j, np.clip(block, -127, 127, out=block).astype(np.int8)
    return absmax, blocks()


def _int8_variable(shape, name):
    """A zero int8 variable to fill block by block with _write_block: its only full-size buffer."""
    return tf.Variable(tf.zeros(shape, tf.int8), trainable=False, name=name)


def _write_block(variable, rows, columns, block):
    """variable[rows, columns] = block, in place. (Slicing the variable in Python would read it
    first, and a sliced write to a variable that is also being read copies it whole.)"""
    tf.raw_ops.ResourceStridedSliceAssign(ref=variable.handle, begin=[rows[0], columns[0]],
                                          end=[rows[1], columns[1]], strides=[1, 1], value=block)


def _plain_reads(variable):
    """Out of copy-on-read mode, where every read of the variable copies it whole. A gather (an
    embedding lookup) or a sliced write puts a variable in it; nothing here reads and writes a
    variable at once, which is what the mode guards, and a copy of a large weight at every read
    would double it in memory and slow the kernels that read it."""
    tf.raw_ops.DisableCopyOnRead(resource=variable.handle)


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
        return _read(self.weight, rows.start, rows.stop) * self.scale[rows, None]


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

    @staticmethod
    def bytes(variables):
        """The bytes of these variables' values (each counted once)."""
        unique = {id(w): w for w in variables}.values()
        return sum(int(np.prod(w.shape)) * w.dtype.size for w in unique)

    def refill(self, variables, read):
        """Give the released ones of `variables` their FP32 values back, from `read(names)` ->
        {name: array} (the source model's checkpoint), and return them: a step runs in FP32."""
        released = [w for w in variables if id(w) in self._released]
        values = read([w.name.split(":")[0] for w in released]) if released else {}
        for w in released:
            tf.raw_ops.AssignVariableOp(resource=w.handle, value=values[w.name.split(":")[0]], validate_shape=False)
            self._released.discard(id(w))
        return released

    def release_again(self, variables):
        """Empty refilled variables again: no step reads them in FP32 after all."""
        self._free(variables)

    def matmul(self, graph, sites):
        """The weights of `sites` side by side as one int8 variable [K, sum of N], with the
        absolute maximum each column scales to and each column's int8 sum."""
        key = ("matmul", tuple((id(graph.feeds[s.weight]), None if s.row_scale is None else s.row_scale.tobytes())
                               for s in sites))
        if key not in self._made:
            widths = [int(graph.feeds[s.weight].shape[1]) for s in sites]
            name = f"{sites[0].matmul if len(sites) == 1 else sites[0].activation}_int8".replace("/", "_").replace(":", "_")
            # written block by block into its variable: beside the FP32 weights, the conversion
            # holds the int8 copy once and a block of rows, never a second full-size array
            q = _int8_variable([int(graph.feeds[sites[0].weight].shape[0]), sum(widths)], name)
            absmax, column_sums, start = [], [], 0
            for site, width in zip(sites, widths):
                w = graph.feeds[site.weight]
                self._check_not_released(w)
                a, blocks = quantized_blocks(w if site.row_scale is None else ScaledRows(w, site.row_scale),
                                             axis=0 if self.per_channel else None)
                sums = np.zeros(width, np.int64)
                for i, j, block in blocks:
                    _write_block(q, (i, j), (start, start + width), block)
                    sums += block.sum(axis=0, dtype=np.int64)
                absmax.append(np.broadcast_to(a, (width,)))
                column_sums.append(sums)
                start += width
            _plain_reads(q)
            self._made[key] = (q, np.concatenate(absmax).astype(np.float32), np.concatenate(column_sums))
            self._free(graph.feeds[s.weight] for s in sites)
        return self._made[key]

    def embedding(self, table):
        """(int8 table, float32 scale per row) variables of an embedding table."""
        key = ("embedding", id(table))
        if key not in self._made:
            self._check_not_released(table)
            if int(np.prod(table.shape)) >= LARGE_TABLE_VALUES:
                # the conversion's peak comes next, the FP32 table beside its int8 copy: what the
                # phases before it (calibration, FP32 steps) freed goes back to the OS first
                return_freed_memory()
            name = table.name.split(":")[0].replace("/", "_")
            absmax, blocks = quantized_blocks(table, axis=1)
            q = _int8_variable(table.shape, f"{name}_int8")
            for i, j, block in blocks:
                _write_block(q, (i, j), (0, q.shape[1]), block)
            _plain_reads(q)
            self._made[key] = (q, tf.Variable((absmax / 127.0).astype(np.float32), trainable=False,
                                              name=f"{name}_row_scale"))
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
