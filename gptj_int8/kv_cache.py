"""The keys and values of past positions, written in place: GPT-J's forward over a preallocated cache.

past_key_values is float32 [n_layer, 2 (key, value), batch, n_head, capacity, head_dim]. The
positions in use are the attention mask's width; the capacity beyond them is room for the next
ones, in steps of CHUNK positions. A step writes its new positions into the buffer it is given
(InplaceUpdate on a 2-D view of it: no copy of the cache) and returns that buffer; only when the
positions outgrow the capacity is it copied once, into a buffer up to CHUNK positions larger.

Each new token's attention reads the whole capacity, the unused positions masked: at most
CHUNK - 1 positions more than in use (bench/generation.py measures what that costs).

Writing in place is what makes a step cost the same at any context, and it has one rule: a cache
passed to a step must not be used again, since the step overwrites it (the host loop in
generation.stream and the `generate` loop pass each cache once). Every buffer is made by one Fill
of its whole shape (never two of the same shape, which the graph optimiser could merge into one).

The projections, rotary embedding, MLP and norms are transformers' own layers of the model;
only the cache and the attention over it are here.
"""
import tensorflow as tf

CHUNK = 128


def capacity_for(positions):
    """The capacity a cache grows to for `positions` in use: the next multiple of CHUNK."""
    return (positions + CHUNK - 1) // CHUNK * CHUNK


def empty(n_layer, batch, n_head, head_dim):
    """A cache of no positions and no capacity: the first step grows it."""
    return tf.zeros([n_layer, 2, batch, n_head, 0, head_dim], tf.float32)


def ensure_capacity(cache, positions):
    """`cache` itself when it has room for `positions`, else a copy CHUNK-aligned and large enough.
    A Pad by nothing returns its input's buffer, so no branch is needed (and a tf.cond would leave
    the graph a Switch between the cache and the step)."""
    capacity = tf.shape(cache)[4]
    more = tf.where(capacity < positions, capacity_for(positions) - capacity, 0)
    return tf.pad(cache, [[0, 0], [0, 0], [0, 0], [0, 0], [0, more], [0, 0]])


def _rotary(attn, x, sincos):
    """transformers' GPT-J rotary embedding of x [batch, seq, head, head_dim] (the layer's own helper)."""
    from transformers.models.gptj.modeling_tf_gptj import apply_rotary_pos_emb
    if attn.rotary_dim is None:
        return apply_rotary_pos_emb(x, sincos)
    return tf.concat([apply_rotary_pos_emb(x[..., :attn.rotary_dim], sincos), x[..., attn.rotary_dim:]], -1)


def attend(flat, layer, rows, q, k, v, visible, padding, scale, cache_shape):
    """One layer's attention over the cache: writes k and v ([batch, head, new, head_dim]) into the
    2-D view `flat` at `rows` (layer 0's key rows of the new positions) and returns (the attention
    output [batch, head, new, head_dim], flat with them written)."""
    n_layer, _, batch, n_head, capacity, head_dim = tf.unstack(cache_shape)
    per_kv = batch * n_head * capacity
    flat = tf.raw_ops.InplaceUpdate(x=flat, i=tf.concat([rows + 2 * layer * per_kv, rows + (2 * layer + 1) * per_kv], 0),
                                    v=tf.reshape(tf.stack([k, v]), [-1, head_dim]))
    # this layer's keys and values: a slice along the first axis, which TensorFlow aliases
    kv = tf.reshape(flat, [n_layer * 2, batch, n_head, capacity, head_dim])[2 * layer:2 * layer + 2]
    # transformers masks unseen keys with -1e9 before scaling and padding with -10000 after: the same here
    scores = tf.where(visible, tf.matmul(q, kv[0], transpose_b=True), -1e9) / scale + padding
    return tf.matmul(tf.nn.softmax(scores + 1e-9, axis=-1), kv[1]), flat


def masks(attention_mask, new, capacity):
    """(visible [new, capacity]: written, and not in the new position's future; padding [batch, 1, 1,
    capacity]: -10000 at padding, as transformers adds it) for the last `new` positions of attention_mask."""
    width = tf.shape(attention_mask)[1]
    visible = tf.range(capacity)[None, :] <= (width - new + tf.range(new))[:, None]
    padding = tf.pad(1.0 - tf.cast(attention_mask, tf.float32), [[0, 0], [0, capacity - width]])
    return visible, (padding * -10000.0)[:, None, None, :]


def key_rows(batch, n_head, capacity, first, new):
    """Rows of the cache's 2-D view [n_layer * 2 * batch * n_head * capacity, head_dim] where layer 0's
    keys of positions first .. first + new - 1 go, in (batch, head, position) order; other layers
    and the values are offsets of these."""
    rows = tf.range(batch * n_head)[:, None] * capacity + (first + tf.range(new))[None, :]
    return tf.reshape(rows, [-1])


def forward(model, input_ids, attention_mask, position_ids, cache):
    """GPT-J over the last input_ids.shape[1] positions of attention_mask, the earlier ones read from
    `cache` (capacity >= attention_mask's width). Returns (the last position's hidden state
    [batch, n_embd] after ln_f, the cache with the new positions written)."""
    t = model.transformer
    batch, new = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
    shape = tf.shape(cache)
    visible, padding = masks(attention_mask, new, shape[4])
    rows = key_rows(batch, shape[3], shape[4], tf.shape(attention_mask)[1] - new, new)
    flat = tf.reshape(cache, [-1, shape[5]])
    # every layer holds the same rotary table: looked up once for all of them
    sincos = tf.split(tf.gather(t.h[0].attn.embed_positions, position_ids, axis=0), 2, axis=-1)
    hidden = t.wte(input_ids, mode="embedding")
    for layer, block in enumerate(t.h):
        attn = block.attn
        x = block.ln_1(hidden)
        q, k = (tf.transpose(_rotary(attn, attn._split_heads(proj(x), True), sincos), (0, 2, 1, 3))
                for proj in (attn.q_proj, attn.k_proj))
        v = attn._split_heads(attn.v_proj(x), False)
        out, flat = attend(flat, layer, rows, q, k, v, visible[None, None], padding, attn.scale_attn, shape)
        hidden = attn.out_proj(attn._merge_heads(out)) + block.mlp(x) + hidden
    hidden = t.ln_f(hidden[:, -1:, :])[:, 0]          # ln_f was built for [batch, seq, n_embd]
    return hidden, tf.reshape(flat, shape)
