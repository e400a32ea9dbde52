"""Calibrate a GPT-J FP32 SavedModel and convert it to INT8 through convert.ConvertSavedModel.

    python quantize.py --output_dir=./output

Writes the INT8 SavedModel (default ./converted_<name>) and, in --output_dir, the graph before
and after the QuantizeV2/Dequantize pairs (extracted_graph_def.pb, converted_graph_def.pb) and
quantize.log. --itex_mode / --performance_only override the defaults set in convert.py.

--engine inc runs Intel Neural Compressor's quantize_model instead (gptj_int8/inc.py) on the same
passages and writes the same outputs; it needs up to about 40x the model's size in memory and refuses
models that would not fit.
"""
import argparse
import logging
from pathlib import Path

from convert import SIDE_FILES, ConvertSavedModel
from gptj_int8 import cli, data, int8_matmul, models, savedmodel

log = logging.getLogger("quantize")
DEFAULT_MODEL = models.default_export_dir(models.BUNDLED_MODEL)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_model", default=str(DEFAULT_MODEL), help="the FP32 SavedModel from prepare_model.py")
    p.add_argument("--converted_model", default=None, help="where the INT8 SavedModel goes (default ./converted_<name>)")
    p.add_argument("--output_dir", default="./output", help="graph dumps and the log")
    p.add_argument("--dataset", default=str(data.CALIBRATION_SET),
                   help="calibration text: JSONL with a 'text' field, or a hub id such as EleutherAI/lambada_openai")
    p.add_argument("--calib_samples", type=cli.positive_int, default=100, help="calibration passages")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --converted_model even if it is not a SavedModel")
    p.add_argument("--itex_mode", action=argparse.BooleanOptionalAction, default=None,
                   help="keep QDQ pairs for Intel Extension for TensorFlow instead of fused int8 kernels")
    p.add_argument("--performance_only", action=argparse.BooleanOptionalAction, default=None,
                   help="also put pairs before the attention BatchMatMulV2s")
    p.add_argument("--per_channel", action=argparse.BooleanOptionalAction, default=None,
                   help="one weight scale per output column (--no-per_channel: one per matrix)")
    p.add_argument("--smooth_quant", action=argparse.BooleanOptionalAction, default=None,
                   help="SmoothQuant: move activation outliers into the weights before quantizing")
    p.add_argument("--sq_alpha", type=float, default=None, help="SmoothQuant migration strength in [0, 1]")
    p.add_argument("--max_accuracy_drop", type=float, default=None,
                   help="keep the most harmful MatMuls in FP32 until the last-token accuracy drop "
                        "(points) on held-out passages of --dataset is within this bound")
    p.add_argument("--force_int8", action=argparse.BooleanOptionalAction, default=None,
                   help="an int8 kernel for every MatMul, even where timing on this CPU finds it slower than FP32")
    p.add_argument("--int8_kernel", choices=["auto", *int8_matmul.FORMS], default=None,
                   help="the int8 kernel: oneDNN's inner product (matmul), its 1x1 convolution (conv), or the "
                        "faster of the two for each kernel as timed on this CPU (auto, the default; conv with "
                        "--force_int8)")
    p.add_argument("--keep_fp32", default=None, metavar="NAMES",
                   help="comma-separated parts of layer names (q_proj, k_proj, v_proj, out_proj, fc_in, fc_out, "
                        "lm_head, h_._0/, ...) whose MatMuls stay FP32 in every signature, e.g. out_proj,lm_head")
    p.add_argument("--holdout_samples", type=cli.positive_int, default=200,
                   help="passages after the calibration ones, for --max_accuracy_drop")
    p.add_argument("--engine", choices=["ours", "inc"], default="ours",
                   help="ours: convert.py's int8 kernels on variables; inc: Intel Neural Compressor 3.10's "
                        "quantize_model (frozen weights, models up to 2 GB and up to ~40x their size in memory)")
    p.add_argument("--max_memory_gb", type=float, default=None,
                   help="with --engine inc: memory this run may use (default: what the OS reports available); "
                        "INC is refused when its estimated need exceeds it")
    args = p.parse_args()

    if args.sq_alpha is not None and not 0.0 <= args.sq_alpha <= 1.0:
        raise cli.UserError(f"--sq_alpha must be within [0, 1], got {args.sq_alpha}")
    if args.max_memory_gb is not None and args.max_memory_gb <= 0:
        raise cli.UserError(f"--max_memory_gb must be positive, got {args.max_memory_gb}")
    input_model = Path(args.input_model)
    converted = Path(args.converted_model or models.default_converted_dir(input_model))
    savedmodel.check_saved_model_dir(input_model)
    if converted.exists() and not (converted / "saved_model.pb").exists() and not args.overwrite:
        raise cli.UserError(f"{converted} exists and is not a SavedModel; pass --overwrite to replace it")
    if args.engine == "inc":
        from gptj_int8 import inc
        inc.check_installed()
        inc.check_supported_flags(args.itex_mode, args.performance_only, args.max_accuracy_drop, args.per_channel,
                                  args.int8_kernel)
        inc.check_fits(input_model, args.max_memory_gb)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(output_dir / "quantize.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)

    tokenizer = models.load_tokenizer(input_model)
    wanted = args.calib_samples + (args.holdout_samples if args.max_accuracy_drop is not None else 0)
    passages = data.load_passages(args.dataset, wanted)
    sequences = data.encode_passages(tokenizer, passages, models.context_length(input_model))
    calib, holdout = sequences[:args.calib_samples], sequences[args.calib_samples:]
    if args.max_accuracy_drop is not None and not holdout:
        raise cli.UserError(f"--max_accuracy_drop needs passages beyond the {args.calib_samples} "
                            f"calibration ones in {args.dataset}")
    log.info("calibrating on %d passages of %s", len(calib), args.dataset)
    if args.engine == "inc":
        inc.quantize_saved_model(input_model, converted, data.batches(calib, 1, tokenizer.pad_token_id), output_dir,
                                 smooth_quant=bool(args.smooth_quant),
                                 sq_alpha=0.5 if args.sq_alpha is None else args.sq_alpha,
                                 itex_mode=bool(args.itex_mode),
                                 side_files=[input_model / f for f in SIDE_FILES if (input_model / f).exists()],
                                 keep_fp32=args.keep_fp32)
        return
    converter = ConvertSavedModel(input_model, converted, data.batches(calib, 1, tokenizer.pad_token_id),
                                  output_dir, itex_mode=args.itex_mode, performance_only=args.performance_only,
                                  per_channel=args.per_channel, smooth_quant=args.smooth_quant,
                                  sq_alpha=args.sq_alpha, max_accuracy_drop=args.max_accuracy_drop,
                                  holdout_batches=data.batches(holdout, 8, tokenizer.pad_token_id),
                                  force_int8=args.force_int8, int8_kernel=args.int8_kernel, keep_fp32=args.keep_fp32)
    converter()


if __name__ == "__main__":
    cli.run(main)
