"""The signatures of a GPT-J SavedModel, and greedy generation over its prefill and decode steps.

    serving_default  input_ids, attention_mask [batch, seq] int32
                     -> logits [batch, seq, vocab] float32
    prefill          input_ids, attention_mask [batch, seq] int32 (left-padded)
                     -> logits [batch, vocab] (the next token's), past_key_values
    decode           input_ids [batch, new], attention_mask [batch, past + new], past_key_values
                     -> logits [batch, vocab], past_key_values (with the new positions written)
    generate         input_ids, attention_mask [batch, seq] (left-padded), max_new_tokens int32 scalar
                     -> sequences [batch, seq + max_new_tokens] int32 (the prompt, then greedy tokens)

past_key_values is float32 [n_layer, 2 (key, value), batch, n_head, capacity, head_dim]: the keys
and values of every position so far, the first attention_mask-width positions in use and room
after them (kv_cache.py). Each step writes its positions into the cache it is given and returns it,
copied into a larger one only every kv_cache.CHUNK positions: a cache passed to decode is spent,
use the one it returns. (Models exported before the cache was written in place return a cache
exactly as long as the positions in use, grown by a concat at every step; both kinds run with this
module's loops.)
Positions come from the attention mask (the count of real tokens before each one), so a
left-padded prompt gets the positions it would have alone.
"""
import numpy as np
import tensorflow as tf

from . import kv_cache

SERVING, PREFILL, DECODE, GENERATE = "serving_default", "prefill", "decode", "generate"
STEPS = (PREFILL, DECODE)
CACHE = "past_key_values"
INPUTS = {SERVING: ("input_ids", "attention_mask"), PREFILL: ("input_ids", "attention_mask"),
          DECODE: ("input_ids", "attention_mask", CACHE)}
OUTPUTS = {SERVING: ("logits",), PREFILL: ("logits", CACHE), DECODE: ("logits", CACHE)}


def token_spec(name):
    return tf.TensorSpec([None, None], tf.int32, name=name)


def cache_spec(n_layer, n_head, head_dim):
    return tf.TensorSpec([n_layer, 2, None, n_head, None, head_dim], tf.float32, name=CACHE)


def input_specs(signature, cache):
    """TensorSpecs of a signature's inputs, in INPUTS order; `cache` is the cache's spec."""
    return [cache if name == CACHE else token_spec(name) for name in INPUTS[signature]]


def positions(attention_mask, length):
    """Position ids of the last `length` tokens: how many real tokens precede each."""
    return tf.math.cumsum(attention_mask, axis=-1, exclusive=True)[:, -length:]


def empty_cache(decode, batch):
    """A cache of no positions for `decode` (a tf.function with an input signature, or a concrete
    function): the prompt goes through decode as the first step of generation."""
    specs = getattr(decode, "input_signature", None) or decode.structured_input_signature[0]
    n_layer, _, _, n_head, _, head_dim = specs[INPUTS[DECODE].index(CACHE)].shape
    return kv_cache.empty(n_layer, batch, n_head, head_dim)


def greedy_generate(decode, eos_token_id, n_positions):
    """The `generate` signature: decode inside a tf.while_loop, the prompt first (from an empty
    cache), then one token at a time, until max_new_tokens or every row has produced EOS (rows that
    did are continued with EOS, as transformers pads finished rows). `decode` takes its inputs in
    INPUTS order and returns a dict, as the signature does.

    One decode in the loop for the prompt and the new tokens: its int8 kernels keep one reordered
    copy of each weight (oneDNN's cache of a kernel is per op), where a prefill beside the loop
    would keep a second."""

    @tf.function(input_signature=[token_spec("input_ids"), token_spec("attention_mask"),
                                  tf.TensorSpec([], tf.int32, name="max_new_tokens")])
    def generate(input_ids, attention_mask, max_new_tokens):
        checks = [tf.debugging.assert_positive(max_new_tokens, message="max_new_tokens must be positive"),
                  tf.debugging.assert_less_equal(
                      tf.shape(input_ids)[1] + max_new_tokens, n_positions,
                      message=f"prompt + max_new_tokens is longer than the context ({n_positions} tokens)")]
        batch = tf.shape(input_ids)[0]
        with tf.control_dependencies(checks):
            past = empty_cache(decode, batch)
        done = tf.zeros([batch], tf.bool)
        tokens = tf.TensorArray(tf.int32, size=0, dynamic_size=True)

        def more(i, fed, done, mask, past, tokens):
            return tf.logical_and(i < max_new_tokens, tf.logical_not(tf.reduce_all(done)))

        def step(i, fed, done, mask, past, tokens):
            out = decode(fed, mask, past)
            token = tf.argmax(out["logits"], axis=-1, output_type=tf.int32)
            token = tf.where(done, eos_token_id, token)
            mask = tf.concat([mask, tf.ones([batch, 1], tf.int32)], axis=1)
            return (i + 1, token[:, None], done | tf.equal(token, eos_token_id), mask, out[CACHE],
                    tokens.write(i, token))

        loop = (tf.constant(0), input_ids, done, attention_mask, past, tokens)
        invariants = (tf.TensorShape([]), tf.TensorShape([None, None]), done.shape, tf.TensorShape([None, None]),
                      tf.TensorShape([None] * 6),   # a converted decode returns the cache without static dims
                      tf.TensorShape(None))
        n, *_, tokens = tf.while_loop(more, step, loop, shape_invariants=invariants)
        new = tf.transpose(tokens.stack())
        new = tf.pad(new, [[0, 0], [0, max_new_tokens - n]], constant_values=eos_token_id)
        return {"sequences": tf.concat([input_ids, new], axis=1)}

    return generate


##### Host-driven generation over the prefill and decode signatures #####


def has_generation(signatures):
    """Whether a model's signatures (a loaded model's `.signatures`, or its SignatureDefs) include
    the generation ones."""
    return all(name in signatures for name in (*STEPS, GENERATE))


def left_pad(prompts, pad_id):
    """Left-padded int32 (input_ids, attention_mask) for token id lists, as `generate` expects."""
    width = max(len(p) for p in prompts)
    input_ids = np.full((len(prompts), width), pad_id, np.int32)
    attention_mask = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = prompt
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def greedy(logits):
    return logits.argmax(-1).astype(np.int32)


def sampler(temperature=1.0, top_k=None, top_p=1.0, seed=None):
    """A choice of next tokens from logits [batch, vocab]: softmax at `temperature`, restricted
    to the `top_k` most likely tokens and to the smallest set whose probability reaches `top_p`."""
    rng = np.random.default_rng(seed)

    def choose(logits):
        logits = logits.astype(np.float64) / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
            logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_probs = np.take_along_axis(probs, order, -1)
            # keep a token while the probability before it is below top_p (the first always stays)
            keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
            keep = np.zeros_like(keep_sorted)
            np.put_along_axis(keep, order, keep_sorted, -1)
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum(-1, keepdims=True)
        return np.array([rng.choice(len(p), p=p) for p in probs], np.int32)
    return choose


def stream(prefill, decode, input_ids, attention_mask, max_new_tokens, choose=greedy, eos_token_id=None,
           forced=None):
    """Yield (tokens [batch], logits [batch, vocab]) one step at a time: prefill, then decode.

    Rows that produced EOS go on with EOS, and the loop ends when all have. With `forced`
    ([batch, max_new_tokens]), each step feeds the forced token instead of the chosen one
    (teacher forcing), while still yielding the chosen one."""
    out = prefill(input_ids=tf.constant(input_ids), attention_mask=tf.constant(attention_mask))
    mask = np.asarray(attention_mask, np.int32)
    done = np.zeros(len(input_ids), bool)
    for step in range(max_new_tokens):
        logits = out["logits"].numpy()
        tokens = choose(logits)
        if eos_token_id is not None:
            tokens = np.where(done, eos_token_id, tokens).astype(np.int32)
            done |= tokens == eos_token_id
        yield tokens, logits
        if step + 1 == max_new_tokens or (eos_token_id is not None and done.all() and forced is None):
            return
        fed = tokens if forced is None else forced[:, step]
        mask = np.concatenate([mask, np.ones((len(mask), 1), np.int32)], axis=1)
        out = decode(input_ids=tf.constant(fed[:, None]), attention_mask=tf.constant(mask),
                     past_key_values=out[CACHE])
