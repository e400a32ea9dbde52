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


def empty(n_layer, batch, n_head, head_dim, capacity=0):
    return tf.zeros([n_layer, 2, batch, n_head, capacity, head_dim], tf.float32)


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


def forward(model, input_ids, attention_mask, position_ids, cache):
    """GPT-J over the last input_ids.shape[1] positions of attention_mask, the earlier ones read from
    `cache` (capacity >= attention_mask's width). Returns (the last position's hidden state
    [batch, n_embd] after ln_f, the cache with the new positions written)."""
    t = model.transformer
    n_layer = len(t.h)
    batch, new = tf.shape(input_ids)[0], tf.shape(input_ids)[1]
    width = tf.shape(attention_mask)[1]
    shape = tf.shape(cache)
    n_head, capacity, head_dim = shape[3], shape[4], shape[5]

    # Which keys each new position sees: written (< width), not padding, not in its future. transformers
    # masks future keys with -1e9 before scaling and padding with -10000 after: the same here.
    key_pos = tf.range(capacity)
    causal = key_pos[None, :] <= (width - new + tf.range(new))[:, None]                  # [new, capacity]
    padding = tf.pad(1.0 - tf.cast(attention_mask, tf.float32), [[0, 0], [0, capacity - width]])
    padding = (padding * -10000.0)[:, None, None, :]                                   # [batch, 1, 1, capacity]

    # Rows of the cache's 2-D view [n_layer * 2 * batch * n_head * capacity, head_dim] that the new
    # positions of layer 0's keys go to, in (batch, head, position) order; other layers and the
    # values are offsets of these.
    rows = (tf.range(batch * n_head)[:, None] * capacity + (width - new + tf.range(new))[None, :])
    rows = tf.reshape(rows, [-1])
    per_kv = batch * n_head * capacity
    flat = tf.reshape(cache, [-1, head_dim])

    hidden = t.wte(input_ids, mode="embedding")
    for layer, block in enumerate(t.h):
        attn = block.attn
        x = block.ln_1(hidden)
        sincos = tf.split(tf.gather(attn.embed_positions, position_ids, axis=0), 2, axis=-1)
        q = _rotary(attn, attn._split_heads(attn.q_proj(x), True), sincos)
        k = _rotary(attn, attn._split_heads(attn.k_proj(x), True), sincos)
        v = attn._split_heads(attn.v_proj(x), True)
        q = tf.transpose(q, (0, 2, 1, 3))                                                  # [batch, head, new, dim]
        written = tf.reshape(tf.transpose(tf.stack([k, v]), (0, 1, 3, 2, 4)), [-1, head_dim])
        flat = tf.raw_ops.InplaceUpdate(x=flat, i=tf.concat([rows + (2 * layer) * per_kv,
                                                               rows + (2 * layer + 1) * per_kv], 0), v=written)
        # this layer's keys and values: a slice along the first axis, which TensorFlow aliases
        kv = tf.reshape(flat, [n_layer * 2, batch, n_head, capacity, head_dim])[2 * layer:2 * layer + 2]
        scores = tf.matmul(q, kv[0], transpose_b=True)
        scores = tf.where(causal[None, None], scores, -1e9) / attn.scale_attn + padding
        weights = tf.nn.softmax(scores + 1e-9, axis=-1)
        out = attn.out_proj(attn._merge_heads(tf.matmul(weights, kv[1])))
        hidden = out + block.mlp(x) + hidden
    hidden = t.ln_f(hidden[:, -1:, :])[:, 0]          # ln_f was built for [batch, seq, n_embd]
    return hidden, tf.reshape(flat, shape)
