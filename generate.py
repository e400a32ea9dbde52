"""Write text with a GPT-J SavedModel (FP32 or INT8) through its prefill and decode signatures.

    python generate.py --model ./converted_gptj-kjv --prompt "And God said" --max_new_tokens 40
    python generate.py --model ./gptj-kjv --prompt_file prompts.txt --do_sample --top_p 0.9 --seed 1

One prompt is printed as it is produced; a --prompt_file (one prompt a line) is run as one
left-padded batch and each text is printed at the end. Greedy unless --do_sample; sampling runs
the sampler of the `generate` signature (gptj_int8.generation.next_tokens), so a --seed gives the
tokens `generate` gives for the same settings and seed. The time to the first new token (the
prompt's prefill) and the median time of each further token follow, measured after one untimed
warm-up step.
"""
import argparse
import logging
import random
import sys
import time
from pathlib import Path

import numpy as np

from gptj_int8 import cli, generation, memory, models, savedmodel

log = logging.getLogger("generate")
DEFAULT_MODEL = models.default_converted_dir(models.default_export_dir(models.BUNDLED_MODEL))


def read_prompts(args):
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise cli.UserError(f"prompt file not found: {path}")
        prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
        prompts = [p for p in prompts if p.strip()]
        if not prompts:
            raise cli.UserError(f"prompt file has no prompts: {path}")
        return prompts
    if not args.prompt.strip():
        raise cli.UserError("the prompt is empty")
    return [args.prompt]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="a SavedModel from prepare_model.py or quantize.py")
    p.add_argument("--prompt", default="And God said", help="the text to continue")
    p.add_argument("--prompt_file", default=None, help="a text file, one prompt a line (run as one batch)")
    p.add_argument("--max_new_tokens", type=cli.positive_int, default=40)
    p.add_argument("--do_sample", action="store_true", help="sample instead of choosing the likeliest token")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="with --do_sample: < 1 sharper, > 1 flatter, 0 the likeliest token")
    p.add_argument("--top_k", type=int, default=0, help="with --do_sample: only the k likeliest tokens (0: all)")
    p.add_argument("--top_p", type=float, default=1.0,
                   help="with --do_sample: only the likeliest tokens whose probabilities add up to p (1: all)")
    p.add_argument("--seed", type=int, default=None,
                   help="with --do_sample: the random seed (default: a new one, logged, to repeat the text with)")
    p.add_argument("--max_memory_gb", type=cli.positive_float, default=None,
                   help="memory this run may use (default: what the OS reports available); a model that needs "
                        "more is refused before it is loaded")
    args = p.parse_args()
    sampling = generation.GREEDY
    if args.do_sample:
        seed = args.seed if args.seed is not None else random.randrange(2 ** 63)
        sampling = generation.Sampling(args.temperature, args.top_k, args.top_p, seed)
        problem = generation.sampling_problem(sampling)
        if problem:
            raise cli.UserError(f"--{problem}")
        if args.seed is None:
            log.info("sampling with --seed %d", seed)

    prompts = read_prompts(args)
    model = Path(args.model)
    savedmodel.check_saved_model_dir(model)
    tokenizer = models.load_tokenizer(model)
    context = models.context_length(model)
    if args.max_new_tokens >= context:
        raise cli.UserError(f"--max_new_tokens {args.max_new_tokens} does not fit the context of {context} tokens")
    memory.check_fits([model], generation.STEPS, args.max_memory_gb, consequence="generate.py cannot load it")
    loaded, _ = savedmodel.load_serving_function(model)
    if not generation.has_generation(loaded.signatures):
        raise cli.UserError(f"{model} has no generation signatures (prefill, decode, generate); "
                            f"re-export it with prepare_model.py and convert it again")
    eos_token_id, _ = models.generation_settings(model)

    encoded = [tokenizer(text)["input_ids"] for text in prompts]
    room = context - args.max_new_tokens
    if any(len(ids) > room for ids in encoded):
        log.warning("prompts longer than %d tokens (the context %d minus --max_new_tokens) keep their last %d tokens",
                    room, context, room)
        encoded = [ids[-room:] for ids in encoded]
    input_ids, attention_mask = generation.left_pad(encoded, tokenizer.pad_token_id)

    prefill, decode = loaded.signatures[generation.PREFILL], loaded.signatures[generation.DECODE]
    # one untimed step first: TensorFlow and oneDNN set up their kernels on the first call
    for _ in generation.stream(prefill, decode, input_ids, attention_mask, 2):
        pass

    streaming = len(prompts) == 1
    if streaming:
        print(prompts[0], end="", flush=True)
    new, times, shown = [], [], ""
    start = time.perf_counter()
    for tokens, _ in generation.stream(prefill, decode, input_ids, attention_mask, args.max_new_tokens,
                                       sampling, eos_token_id):
        times.append(time.perf_counter() - start)
        new.append(tokens)
        if streaming:
            # decode the whole continuation each time: a character may span several tokens
            text = tokenizer.decode([t for t in np.concatenate(new) if t != eos_token_id])
            print(text[len(shown):], end="", flush=True)
            shown = text
        start = time.perf_counter()
    if streaming:
        print()
    else:
        rows = np.stack(new, axis=1)
        for prompt, row in zip(prompts, rows):
            print(prompt + tokenizer.decode([t for t in row if t != eos_token_id]))
            print()
    per_token = f"{np.median(times[1:]) * 1000:.1f} ms/token" if len(times) > 1 else "no further tokens"
    print(f"first token {times[0] * 1000:.1f} ms, then {per_token} "
          f"(batch {len(prompts)}, {len(times)} new tokens)", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
