"""ConvertSavedModel: FP32 GPT-J SavedModel -> calibrated INT8 SavedModel.

Edit the flags in __init__ to change the defaults (quantize.py's flags override them):
    self.itex_mode = False         # True: keep QuantizeV2/Dequantize pairs for Intel Extension
                                   # for TensorFlow to fuse; stock TensorFlow runs them as fake
                                   # quantization. False: fuse them into oneDNN int8 kernels.
    self.performance_only = False  # True: also put pairs before the attention BatchMatMulV2s.
    self.per_channel = True        # one int8 scale per output column of each weight (False: one
                                   # per weight matrix).
    self.smooth_quant = False      # True: SmoothQuant, activation outliers moved into the weights
    self.sq_alpha = 0.5            # SmoothQuant's migration strength, 0 (none) to 1 (all)
    self.max_accuracy_drop = None  # e.g. 0.5: keep the most harmful MatMuls in FP32 until the
                                   # last-token accuracy drop on held-out passages is <= 0.5 points
"""
import logging
from pathlib import Path

from gptj_int8 import calibration, fallback, qdq, savedmodel
from gptj_int8.cli import UserError

log = logging.getLogger(__name__)

# Files prepare_model.py writes beside the SavedModel, carried over to the converted one.
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "merges.txt", "added_tokens.json")


class ConvertSavedModel:
    def __init__(self, src, dst, calibration_batches, output_dir="./output",
                 itex_mode=None, performance_only=None, per_channel=None, smooth_quant=None, sq_alpha=None,
                 max_accuracy_drop=None, holdout_batches=()):
        self.itex_mode = False
        self.performance_only = False
        self.per_channel = True
        self.smooth_quant = False
        self.sq_alpha = 0.5
        self.max_accuracy_drop = None
        # flags given by the caller (quantize.py's command line) override the defaults above
        for name, value in (("itex_mode", itex_mode), ("performance_only", performance_only),
                            ("per_channel", per_channel), ("smooth_quant", smooth_quant),
                            ("sq_alpha", sq_alpha), ("max_accuracy_drop", max_accuracy_drop)):
            if value is not None:
                setattr(self, name, value)
        self.src = Path(src)
        self.dst = Path(dst)
        self.output_dir = Path(output_dir)
        self.calibration_batches = calibration_batches
        self.holdout_batches = list(holdout_batches)
        self.kept_in_fp32 = []
        if not calibration_batches:
            raise UserError("calibration needs at least one passage")
        if self.dst.resolve() == self.src.resolve() or self.src.resolve() in self.dst.resolve().parents:
            raise UserError(f"the converted model cannot be written inside the input model: {self.dst}")

    def __call__(self):
        loaded, fn = savedmodel.load_serving_function(self.src)
        graph = savedmodel.extract_serving_graph(loaded, fn)
        savedmodel.write_graph_def(graph.graph_def, self.output_dir / "extracted_graph_def.pb")

        graph, sites = qdq.share_equal_inputs(graph, qdq.find_matmul_sites(graph))
        pair_ops = ["ConcatV2"] + (["BatchMatMulV2"] if self.performance_only else [])
        pair_inputs = qdq.find_pair_inputs(graph, pair_ops)
        log.info("quantizing %d MatMuls and %d inputs of %s (itex_mode=%s, per_channel=%s, smooth_quant=%s)",
                 len(sites), len(pair_inputs), "/".join(pair_ops), self.itex_mode, self.per_channel,
                 self.smooth_quant and self.sq_alpha)
        ranges = calibration.collect_activation_ranges(
            graph, [s.activation for s in sites] + [t for _, _, t in pair_inputs], self.calibration_batches)

        graph = qdq.insert_input_pairs(graph, pair_inputs, ranges)
        if self.smooth_quant:
            graph, sites, ranges = qdq.smooth_activations(graph, sites, ranges, self.sq_alpha)

        def quantize(graph, chosen):
            form = qdq.insert_qdq_pairs if self.itex_mode else qdq.fuse_int8_matmuls
            return form(graph.copy(), chosen, ranges, self.per_channel)

        if self.max_accuracy_drop is not None:
            if not self.holdout_batches:
                raise UserError("the accuracy-aware fallback needs held-out passages")
            kept = fallback.choose_fp32_sites(graph, sites, quantize, self.holdout_batches,
                                              self.max_accuracy_drop)
            self.kept_in_fp32 = [s.matmul for s in kept]
            log.info("kept in FP32: %s", ", ".join(self.kept_in_fp32) or "none")
            sites = [s for s in sites if s.matmul not in self.kept_in_fp32]
        graph = quantize(graph, sites)
        graph = qdq.quantize_embeddings(graph, qdq.find_embeddings(graph))
        graph = savedmodel.prune(graph)
        savedmodel.write_graph_def(graph.graph_def, self.output_dir / "converted_graph_def.pb")

        side_files = [self.src / f for f in SIDE_FILES if (self.src / f).exists()]
        out = savedmodel.save_serving_graph(graph, self.dst, extra_files=side_files)
        log.info("wrote %s (%.1f MB; FP32 %.1f MB)", out, savedmodel.saved_model_size(out) / 1e6,
                 savedmodel.saved_model_size(self.src) / 1e6)
        return out
