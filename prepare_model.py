"""Export a Hugging Face GPT-J (TFGPTJForCausalLM) as an FP32 SavedModel.

    python prepare_model.py                                   # the bundled models/gptj-kjv
    python prepare_model.py --model EleutherAI/gpt-j-6B       # the real one (needs the hub)
    python prepare_model.py --model EleutherAI/gpt-j-6B --revision float16   # its float16 branch: half the download
    python prepare_model.py --model ./my-finetune             # a folder written by save_pretrained
    python prepare_model.py --random_init --config_overrides "n_layer=1,n_embd=4096" \
        --output_dir ./gptj-random-1l                         # GPT-J-6B's width, random weights

serving_default: input_ids, attention_mask (int32 [batch, seq]) -> logits (float32).
The tokenizer and config are written beside the SavedModel, so later steps need no --model.
"""
import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("USE_TF", "AUTO")   # transformers may need torch here: a pytorch_model.bin is read with it
from gptj_int8 import checkpoints, cli, models, savedmodel

log = logging.getLogger("prepare_model")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(models.BUNDLED_MODEL),
                   help="Hugging Face id or local folder of a GPT-J checkpoint: model.safetensors (or its "
                        "shards and index) in float32/float16/bfloat16, tf_model.h5, or pytorch_model.bin "
                        "(needs torch)")
    p.add_argument("--revision", default=None, help="with a hub id: the branch, tag or commit, e.g. float16")
    p.add_argument("--output_dir", default=None, help="where the SavedModel goes (default ./<model name>)")
    p.add_argument("--random_init", action="store_true",
                   help="random weights from GPTJConfig (GPT-J-6B's shape) instead of loading --model")
    p.add_argument("--config_overrides", default="", help='with --random_init, e.g. "n_layer=1,n_embd=4096"')
    p.add_argument("--seed", type=int, default=0, help="seed of --random_init")
    p.add_argument("--tokenizer", default=None,
                   help="with --random_init: a folder with tokenizer files (default GPT-J's BPE)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output_dir even if it is not a SavedModel (one is replaced anyway)")
    args = p.parse_args()

    overrides = models.parse_config_overrides(args.config_overrides)
    if overrides and not args.random_init:
        raise cli.UserError("--config_overrides applies only with --random_init")
    if args.revision and args.random_init:
        raise cli.UserError("--revision applies to --model, not to --random_init")
    out = Path(args.output_dir or ("./gptj-random" if args.random_init else models.default_export_dir(args.model)))
    if out.exists() and not (out / "saved_model.pb").exists() and not args.overwrite:
        raise cli.UserError(f"{out} exists and is not a SavedModel; pass --overwrite to replace it")

    if args.random_init:
        log.info("building a random GPT-J (%s), seed %d", overrides or "GPT-J-6B's shape", args.seed)
        from transformers import GPTJConfig
        tokenizer = models.load_tokenizer(args.tokenizer) if args.tokenizer else models.gpt2_bpe_tokenizer()
        vocab_size = GPTJConfig(**overrides).vocab_size
        if vocab_size < len(tokenizer):
            raise cli.UserError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        model = models.random_gptj(overrides, args.seed)
    else:
        log.info("loading %s", args.model)
        # the checkpoint's headers and the tokenizer first: a broken checkpoint fails in seconds,
        # not after loading GPT-J-6B's 24 GB
        checkpoint = checkpoints.locate_checkpoint(args.model, args.revision)
        tokenizer = models.load_tokenizer(args.model, args.revision)
        model = models.gptj_from_checkpoint(checkpoint)
    n_params = sum(int(v.shape.num_elements()) for v in model.variables)
    log.info("exporting %.1fM parameters to %s", n_params / 1e6, out)

    with savedmodel.atomic_folder(out) as tmp:
        models.export_saved_model(model, tmp)
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("wrote %s", out)


if __name__ == "__main__":
    cli.run(main)
