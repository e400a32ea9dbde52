"""The signatures of a GPT-J SavedModel, and generation (greedy or sampled) over its prefill and decode steps.

    serving_default  input_ids, attention_mask [batch, seq] int32
                     -> logits [batch, seq, vocab] float32
    prefill          input_ids, attention_mask [batch, seq] int32 (left-padded)
                     -> logits [batch, vocab] (the next token's), past_key_values
    decode           input_ids [batch, new], attention_mask [batch, past + new], past_key_values
                     -> logits [batch, vocab], past_key_values (with the new positions written)
    generate         input_ids, attention_mask [batch, seq] (left-padded), max_new_tokens int32 scalar,
                     temperature float32, top_k int32, top_p float32, seed int64 scalars (Sampling)
                     -> sequences [batch, seq + max_new_tokens] int32 (the prompt, then the new tokens),
                        lengths [batch] int32 (each row's new tokens up to and including its EOS)

past_key_values is float32 [n_layer, 2 (key, value), batch, n_head, capacity, head_dim]: the keys
and values of every position so far, the first attention_mask-width positions in use and room
after them (kv_cache.py). Each step writes its positions into the cache it is given and returns it,
copied into a larger one only every kv_cache.CHUNK positions: a cache passed to decode is spent,
use the one it returns. (Models exported before the cache was written in place return a cache
exactly as long as the positions in use, grown by a concat at every step; both kinds run with this
module's loops.)
Positions come from the attention mask (the count of real tokens before each one), so a
left-padded prompt gets the positions it would have alone.

Each next token is chosen by next_tokens, one TensorFlow function run inside `generate`'s loop and,
as a graph of its own, by the host loop (stream): the same settings and seed give the same tokens.
"""
from typing import NamedTuple

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


def generate_signature(decode, eos_token_id, n_positions):
    """The `generate` signature: decode inside a tf.while_loop, the prompt first (from an empty
    cache), then one token at a time chosen by next_tokens under the request's Sampling settings,
    until max_new_tokens or every row has produced EOS (rows that did are continued with EOS, as
    transformers pads finished rows). `decode` takes its inputs in INPUTS order and returns a dict,
    as the signature does.

    Bad settings fail the request (InvalidArgumentError, "top_p must be a number in (0, 1] (1: no
    limit), got 1.5"), as a bad max_new_tokens does; nothing is clamped, except that a top_k beyond
    the vocabulary is no limit.

    One decode in the loop for the prompt and the new tokens: its int8 kernels keep one reordered
    copy of each weight (oneDNN's cache of a kernel is per op), where a prefill beside the loop
    would keep a second."""

    @tf.function(input_signature=[token_spec("input_ids"), token_spec("attention_mask"),
                                  tf.TensorSpec([], tf.int32, name="max_new_tokens"), *sampling_specs()])
    def generate(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p, seed):
        checks = [tf.debugging.assert_positive(max_new_tokens, message="max_new_tokens must be positive"),
                  tf.debugging.assert_less_equal(
                      tf.shape(input_ids)[1] + max_new_tokens, n_positions,
                      message=f"prompt + max_new_tokens is longer than the context ({n_positions} tokens)")]
        checks += sampling_checks(temperature, top_k, top_p)
        batch = tf.shape(input_ids)[0]
        with tf.control_dependencies(checks):
            past = empty_cache(decode, batch)
        done = tf.zeros([batch], tf.bool)
        lengths = tf.zeros([batch], tf.int32)
        tokens = tf.TensorArray(tf.int32, size=0, dynamic_size=True)

        def more(i, fed, done, lengths, mask, past, tokens):
            return tf.logical_and(i < max_new_tokens, tf.logical_not(tf.reduce_all(done)))

        def step(i, fed, done, lengths, mask, past, tokens):
            out = decode(fed, mask, past)
            token = next_tokens(out["logits"], temperature, top_k, top_p, seed, i)
            token = tf.where(done, eos_token_id, token)
            lengths += tf.cast(tf.logical_not(done), tf.int32)
            mask = tf.concat([mask, tf.ones([batch, 1], tf.int32)], axis=1)
            return (i + 1, token[:, None], done | tf.equal(token, eos_token_id), lengths, mask, out[CACHE],
                    tokens.write(i, token))

        loop = (tf.constant(0), input_ids, done, lengths, attention_mask, past, tokens)
        invariants = (tf.TensorShape([]), tf.TensorShape([None, None]), done.shape, lengths.shape,
                      tf.TensorShape([None, None]),
                      tf.TensorShape([None] * 6),   # a converted decode returns the cache without static dims
                      tf.TensorShape(None))
        n, _, _, lengths, _, _, tokens = tf.while_loop(more, step, loop, shape_invariants=invariants)
        new = tf.transpose(tokens.stack())
        new = tf.pad(new, [[0, 0], [0, max_new_tokens - n]], constant_values=eos_token_id)
        return {"sequences": tf.concat([input_ids, new], axis=1), "lengths": lengths}

    return generate


##### Choosing the next token: one sampler for the `generate` graph and the host loop #####


class Sampling(NamedTuple):
    """How each next token is chosen: the `generate` signature's inputs beside the prompt."""
    temperature: float = 0.0   # 0: greedy (the likeliest token); else softmax(logits / temperature)
    top_k: int = 0             # only the k likeliest tokens; 0: no limit
    top_p: float = 1.0         # only the fewest likeliest tokens whose probabilities reach p; 1: no limit
    seed: int = 0              # with the step, keys the random draw: the same request, the same tokens


GREEDY = Sampling()
SAMPLING_DTYPES = {"temperature": tf.float32, "top_k": tf.int32, "top_p": tf.float32, "seed": tf.int64}
# What a setting must be; generate.py's errors and the signature's failed requests both say it.
SAMPLING_RULES = {"temperature": "a number >= 0 (0: greedy)", "top_k": "an integer >= 0 (0: no limit)",
                  "top_p": "a number in (0, 1] (1: no limit)"}
# top_p without top_k finds where its nucleus ends without sorting GPT-J's whole vocabulary (50400
# tokens, ~6 ms a row, a fifth of a decode step of one 6B-width layer at batch 1): each row's logits
# are counted into NUCLEUS_BUCKETS equal intervals of value, the interval where the running mass from
# the top reaches top_p is found, and only its tokens are sorted (at most NUCLEUS_CANDIDATES of them;
# the full sort runs only when a row holds more there, such as logits all equal). The intervals span
# the row's largest logit down to NUCLEUS_DEPTH below the log of its total mass, or its smallest if
# higher: a vocabulary's worth of tokens below that weighs under 50400 * e^-30 = 5e-9, less than
# float32 tells apart below 1, so the nucleus of any top_p ends above it.
NUCLEUS_BUCKETS = 8192
NUCLEUS_CANDIDATES = 256
NUCLEUS_DEPTH = 30.0
DRAW_BLOCK = 256          # draw's blocks of tokens


def sampling_specs():
    return [tf.TensorSpec([], dtype, name=name) for name, dtype in SAMPLING_DTYPES.items()]


def sampling_inputs(sampling):
    """{input name: scalar tensor} of Sampling settings, as `generate` and next_tokens take them. A
    top_k beyond int32 is no limit anyway, and any integer is a seed (wrapped into int64)."""
    top_k = int(np.clip(sampling.top_k, np.iinfo(np.int32).min, np.iinfo(np.int32).max))
    seed = (int(sampling.seed) + 2 ** 63) % 2 ** 64 - 2 ** 63
    values = {"temperature": sampling.temperature, "top_k": top_k, "top_p": sampling.top_p, "seed": seed}
    return {name: tf.constant(values[name], dtype) for name, dtype in SAMPLING_DTYPES.items()}


def sampling_valid(temperature, top_k, top_p):
    """{setting: bool tensor, whether its value keeps SAMPLING_RULES}, in a graph or eagerly."""
    return {"temperature": tf.math.is_finite(temperature) & (temperature >= 0), "top_k": top_k >= 0,
            "top_p": (top_p > 0) & (top_p <= 1)}


def sampling_problem(sampling):
    """What is wrong with Sampling settings, as one sentence (naming the setting), or None."""
    inputs = sampling_inputs(sampling)
    valid = sampling_valid(inputs["temperature"], inputs["top_k"], inputs["top_p"])
    for name, ok in valid.items():
        if not bool(ok):
            return f"{name} must be {SAMPLING_RULES[name]}, got {getattr(sampling, name)}"
    return None


def sampling_checks(temperature, top_k, top_p):
    """Asserts that fail a `generate` request on bad settings with sampling_problem's words."""
    values = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    return [tf.debugging.Assert(ok, [f"{name} must be {SAMPLING_RULES[name]}, got", values[name]])
            for name, ok in sampling_valid(temperature, top_k, top_p).items()]


def allowed_logits(logits, top_k, top_p):
    """logits [batch, vocab] with -inf outside the top_k likeliest tokens (0: no limit), then outside
    the fewest likeliest whose probabilities (softmax of what is left) reach top_p (1: no limit): a
    token stays while the ones likelier than it have less than top_p, so the likeliest always does.
    Tokens tied with the last one kept stay too."""
    vocab = tf.shape(logits)[-1]

    def lowest_in_top_k():
        values = tf.math.top_k(logits, top_k).values                  # descending
        log_total = tf.reduce_logsumexp(values, axis=-1, keepdims=True)
        return tf.cond(top_p < 1, lambda: nucleus_end(values, log_total, top_p), lambda: values[:, -1:])

    def lowest_in_nucleus():
        log_total = tf.reduce_logsumexp(logits, axis=-1, keepdims=True)
        lowest, complete = nucleus_end_by_intervals(logits, log_total, top_p)
        return tf.cond(complete, lambda: lowest,
                       lambda: nucleus_end(tf.math.top_k(logits, vocab).values, log_total, top_p))

    return tf.cond((top_k > 0) & (top_k < vocab), lambda: cut_below(logits, lowest_in_top_k()),
                   lambda: tf.cond(top_p < 1, lambda: cut_below(logits, lowest_in_nucleus()), lambda: logits))


def nucleus_end(ranked, log_total, top_p, above=0.0):
    """[batch, 1] the lowest of `ranked` (logits in descending order, -inf where a row has fewer;
    each token's probability exp(logit - log_total)) that top_p keeps, when the tokens likelier than
    them hold `above` of the mass ([batch, 1]; 0 when they are the likeliest)."""
    before = above + tf.math.cumsum(tf.exp(ranked - log_total), axis=-1, exclusive=True)
    kept = tf.reduce_sum(tf.cast(before < top_p, tf.int32), axis=-1)
    # at least the first; never a -inf, whose zero probability float rounding can leave below top_p
    kept = tf.clip_by_value(kept, 1, tf.maximum(tf.reduce_sum(tf.cast(ranked > -np.inf, tf.int32), axis=-1), 1))
    return tf.gather(ranked, kept[:, None] - 1, batch_dims=1)


def nucleus_end_by_intervals(logits, log_total, top_p):
    """nucleus_end's ([batch, 1] lowest logit top_p keeps, complete) without a full sort: the mass of
    each row's NUCLEUS_BUCKETS intervals of logit value (the lowest also holding everything below the
    span), summed from the top, gives the interval where the nucleus ends; that interval's tokens,
    sorted, with the mass above it, give the last token kept. Incomplete where some row's interval
    holds more than NUCLEUS_CANDIDATES tokens."""
    batch = tf.shape(logits)[0]
    top = tf.reduce_max(logits, axis=-1, keepdims=True)
    low = tf.maximum(tf.reduce_min(logits, axis=-1, keepdims=True), log_total - NUCLEUS_DEPTH)
    scale = NUCLEUS_BUCKETS / tf.maximum(top - low, 1e-30)      # interval index grows with the logit
    bucket = tf.clip_by_value(tf.cast(tf.floor((logits - low) * scale), tf.int32), 0, NUCLEUS_BUCKETS - 1)
    probs = tf.exp(logits - log_total)
    rows = tf.range(batch)[:, None] * NUCLEUS_BUCKETS
    mass = tf.reshape(tf.math.unsorted_segment_sum(probs, bucket + rows, batch * NUCLEUS_BUCKETS),
                      [batch, NUCLEUS_BUCKETS])
    above = tf.math.cumsum(mass, axis=-1, exclusive=True, reverse=True)     # in the intervals above
    end = tf.maximum(tf.reduce_sum(tf.cast(above + mass >= top_p, tf.int32), axis=-1) - 1, 0)
    inside = tf.equal(bucket, end[:, None])
    count = tf.reduce_sum(tf.cast(inside, tf.int32), axis=-1)
    ranked = tf.math.top_k(tf.where(inside, logits, -np.inf),
                           tf.minimum(NUCLEUS_CANDIDATES, tf.shape(logits)[1])).values
    lowest = nucleus_end(ranked, log_total, top_p, tf.gather(above, end[:, None], batch_dims=1))
    return lowest, tf.reduce_all(count <= NUCLEUS_CANDIDATES)


def cut_below(logits, lowest):
    return tf.where(logits >= lowest, logits, -np.inf)


def draw(logits, seed, step):
    """One token per row [batch] int32 from the softmax of logits [batch, vocab] (-inf: never), by the
    inverse of its cumulative distribution, summed in float64, at one stateless uniform per row keyed
    by (seed, step). Row r takes the r-th number of the key's stream whatever the batch size and the
    number of threads (tf.random.stateless_categorical's draws change with how its kernel splits the
    batch over threads), so rows draw independently and every server draws alike from equal logits.

    The distribution is summed in blocks of DRAW_BLOCK tokens, then within the block drawn: a
    running sum over the whole vocabulary is serial, 3 ms of a batch of 8 at GPT-J's 50400 tokens."""
    batch, vocab = tf.shape(logits)[0], tf.shape(logits)[1]
    weights = tf.cast(tf.exp(logits - tf.reduce_max(logits, axis=-1, keepdims=True)), tf.float64)
    weights = tf.reshape(tf.pad(weights, [[0, 0], [0, -vocab % DRAW_BLOCK]]), [batch, -1, DRAW_BLOCK])
    sums = tf.reduce_sum(weights, axis=-1)
    before = tf.math.cumsum(sums, axis=-1, exclusive=True)
    total = before[:, -1:] + sums[:, -1:]
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
    uniform = tf.random.stateless_uniform([batch, 1], key, dtype=tf.float64)
    # Each point is kept below the sum it falls in (float rounding could reach it), so it always
    # lands on a token of positive weight: never one outside top_k or top_p.
    point = tf.minimum(uniform * total, below_float(total))
    block = tf.searchsorted(before + sums, point, side="right", out_type=tf.int32)
    inside = tf.math.cumsum(tf.gather(weights, block, batch_dims=1)[:, 0], axis=-1)
    point = tf.minimum(point - tf.gather(before, block, batch_dims=1), below_float(inside[:, -1:]))
    return block[:, 0] * DRAW_BLOCK + tf.searchsorted(inside, point, side="right", out_type=tf.int32)[:, 0]


def below_float(x):
    """The largest float below each positive x."""
    return tf.math.nextafter(x, tf.zeros_like(x))


def next_tokens(logits, temperature, top_k, top_p, seed, step):
    """The next tokens [batch] int32 for logits [batch, vocab] under valid Sampling settings, at
    generation step `step` (0: the prompt's): the argmax at temperature 0, else a draw (keyed by seed
    and step) from the softmax of logits / temperature limited by top_k and top_p (allowed_logits).
    The logits are shifted by their maximum before the division, so a tiny temperature cannot
    overflow them."""
    def sample():
        scaled = (logits - tf.reduce_max(logits, axis=-1, keepdims=True)) / temperature
        return draw(allowed_logits(scaled, top_k, top_p), seed, step)
    return tf.cond(temperature > 0, sample, lambda: tf.argmax(logits, axis=-1, output_type=tf.int32))


# The host loop runs the sampler as a graph, as `generate` does, not op by op.
_next_tokens_graph = tf.function(next_tokens, input_signature=[
    tf.TensorSpec([None, None], tf.float32), *sampling_specs(), tf.TensorSpec([], tf.int32)])


def generate_inputs(generate, input_ids, attention_mask, max_new_tokens, sampling=GREEDY):
    """Keyword inputs of a `generate` signature (or of generate_signature's function). One converted
    before sampling existed (no `temperature` input) is greedy only: it gets no sampling inputs, and
    other settings are refused."""
    feed = {"input_ids": tf.constant(input_ids, tf.int32), "attention_mask": tf.constant(attention_mask, tf.int32),
            "max_new_tokens": tf.constant(max_new_tokens, tf.int32)}
    # a signature (a concrete function) or the tf.function it is made from
    specs = getattr(generate, "input_signature", None) or tf.nest.flatten(generate.structured_input_signature)
    if "temperature" in {spec.name for spec in specs}:
        return {**feed, **sampling_inputs(sampling)}
    if sampling.temperature > 0:
        raise ValueError("this model's `generate` signature is greedy only (converted before sampling existed); "
                         "sample through prefill and decode (stream), or export and convert it again")
    return feed


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


def stream(prefill, decode, input_ids, attention_mask, max_new_tokens, sampling=GREEDY, eos_token_id=None,
           forced=None):
    """Yield (tokens [batch], logits [batch, vocab]) one step at a time: prefill, then decode, each
    step's tokens chosen by next_tokens under `sampling` (Sampling), as `generate` chooses them.

    Rows that produced EOS go on with EOS, and the loop ends when all have. With `forced`
    ([batch, max_new_tokens]), each step feeds the forced token instead of the chosen one
    (teacher forcing), while still yielding the chosen one."""
    problem = sampling_problem(sampling)
    if problem:
        raise ValueError(problem)
    settings = sampling_inputs(sampling)
    out = prefill(input_ids=tf.constant(input_ids), attention_mask=tf.constant(attention_mask))
    mask = np.asarray(attention_mask, np.int32)
    done = np.zeros(len(input_ids), bool)
    for step in range(max_new_tokens):
        tokens = _next_tokens_graph(out["logits"], **settings, step=tf.constant(step)).numpy()
        logits = out["logits"].numpy()
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
