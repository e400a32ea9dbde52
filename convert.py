"""ConvertSavedModel: FP32 GPT-J SavedModel -> calibrated INT8 SavedModel.

Edit the flags in __init__ to change the defaults (quantize.py's flags override them):
    self.itex_mode = False         # True: QuantizeV2/Dequantize pairs before the MatMuls and the
                                   # float ConcatV2s, for Intel Extension for TensorFlow to fuse;
                                   # stock TensorFlow runs them as fake quantization. False: the
                                   # MatMuls' pairs fused into oneDNN int8 kernels, where int8 is
                                   # faster on this CPU; ConcatV2s stay FP32 (stock TensorFlow
                                   # has no int8 ConcatV2: its pairs would cost time and accuracy).
    self.performance_only = False  # True: also put pairs before the attention BatchMatMulV2s.
    self.per_channel = True        # one int8 scale per output column of each weight (False: one
                                   # per weight matrix).
    self.smooth_quant = False      # True: SmoothQuant, activation outliers moved into the weights
    self.sq_alpha = 0.5            # SmoothQuant's migration strength, 0 (none) to 1 (all)
    self.max_accuracy_drop = None  # e.g. 0.5: keep the most harmful MatMuls in FP32 until the
                                   # last-token accuracy drop on held-out passages is <= 0.5 points
    self.force_int8 = False        # True: an int8 kernel for every MatMul. False: each kernel is
                                   # timed against its FP32 MatMuls at the model's shapes on this
                                   # CPU, and MatMuls stay FP32 where int8 is slower.
    self.int8_kernel = "auto"      # "matmul": oneDNN's int8 inner product (_QuantizedMatMul);
                                   # "conv": its 1x1 convolution (_FusedQuantizedConv2D), at one
                                   # row several times faster on AVX2; "auto": the faster of the
                                   # two for each kernel as timed on this CPU, or "conv" with
                                   # force_int8 (the same graph on every run and CPU).
    self.keep_fp32 = ""            # e.g. "out_proj,lm_head": the MatMuls whose layer name (as in
                                   # transformers' GPT-J: transformer/h_._0/attn/q_proj, ...,
                                   # lm_head) contains one of these stay FP32 in every signature.
"""
import gc
import logging
from pathlib import Path

from gptj_int8 import (calibration, fallback, generation, int8_matmul, kernel_choice, models, qdq, savedmodel, sites,
                       smoothquant, weights)
from gptj_int8.cli import UserError
from gptj_int8.generation import DECODE, PREFILL, SERVING

log = logging.getLogger(__name__)

# The FP32 weights a signature's whole step may read back from the source model to be timed beside
# its int8 step, call by call (_keep_fastest_steps): a model of GPT-J-6B's width has more per layer.
STEP_REFILL_BYTES = 256 << 20

# Files prepare_model.py writes beside the SavedModel, carried over to the converted one.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")


class ConvertSavedModel:
    def __init__(self, src, dst, calibration_batches, output_dir="./output",
                 itex_mode=None, performance_only=None, per_channel=None, smooth_quant=None, sq_alpha=None,
                 max_accuracy_drop=None, holdout_batches=(), force_int8=None, int8_kernel=None, keep_fp32=None,
                 kernel_choice=None):
        self.itex_mode = False
        self.performance_only = False
        self.per_channel = True
        self.smooth_quant = False
        self.sq_alpha = 0.5
        self.max_accuracy_drop = None
        self.force_int8 = False
        self.int8_kernel = "auto"
        self.keep_fp32 = ""
        # flags given by the caller (quantize.py's command line) override the defaults above
        for name, value in (("itex_mode", itex_mode), ("performance_only", performance_only),
                            ("per_channel", per_channel), ("smooth_quant", smooth_quant),
                            ("sq_alpha", sq_alpha), ("max_accuracy_drop", max_accuracy_drop),
                            ("force_int8", force_int8), ("int8_kernel", int8_kernel), ("keep_fp32", keep_fp32)):
            if value is not None:
                setattr(self, name, value)
        self.src = Path(src)
        self.dst = Path(dst)
        self.output_dir = Path(output_dir)
        self.calibration_batches = calibration_batches
        self.holdout_batches = list(holdout_batches)
        # given instead of timed (tests build any CPU's choices this way): a function (signature,
        # the group's layer names, kernel_choice.GroupShape) -> kernel_choice.FP32 or an int8 form
        self.kernel_choice = kernel_choice
        self.kept_by_request = []   # MatMuls keep_fp32 kept in FP32
        self.kept_in_fp32 = []      # MatMuls the accuracy-aware fallback kept in FP32
        self.kept_for_speed = {}    # signature -> MatMuls kept in FP32 because int8 was slower
        self.kernel_forms = {}      # signature -> {int8 form: number of kernels}
        if self.int8_kernel not in ("auto", *int8_matmul.FORMS):
            raise UserError(f"int8_kernel must be auto, {' or '.join(int8_matmul.FORMS)}, not {self.int8_kernel!r}")
        if not calibration_batches:
            raise UserError("calibration needs at least one passage")
        if self.dst.resolve() == self.src.resolve() or self.src.resolve() in self.dst.resolve().parents:
            raise UserError(f"the converted model cannot be written inside the input model: {self.dst}")

    def __call__(self):
        loaded, functions = savedmodel.load_signatures(self.src)
        graphs = {name: savedmodel.extract_serving_graph(loaded, fn, name) for name, fn in functions.items()}
        # the FP32 prefill, for decode's inputs, from a copy of its graph: the loaded functions' own
        # graphs (tens of MB per layer) are let go; the variables live on in the graphs' feeds
        prefill = graphs[PREFILL].copy().serving_fn() if PREFILL in graphs else None
        del loaded, functions
        gc.collect()
        savedmodel.write_graph_def(graphs[SERVING].graph_def, self.output_dir / "extracted_graph_def.pb")

        found = {}
        for name, graph in graphs.items():
            graphs[name], found[name] = sites.share_equal_inputs(graph, sites.find_matmul_sites(graph))
        found = self._keep_requested_in_fp32(graphs, found)
        pair_ops = (["ConcatV2"] if self.itex_mode else []) + (["BatchMatMulV2"] if self.performance_only else [])
        pairs = {name: sites.find_pair_inputs(graph, pair_ops) for name, graph in graphs.items()}
        log.info("quantizing %d MatMuls and %d inputs of %s in %s (itex_mode=%s, per_channel=%s, smooth_quant=%s)",
                 len(found[SERVING]), len(pairs[SERVING]), "/".join(pair_ops) or "other ops", ", ".join(graphs),
                 self.itex_mode, self.per_channel, self.smooth_quant and self.sq_alpha)
        ranges = self._calibrate(graphs, found, pairs, prefill)

        scales = {}   # SmoothQuant scales, shared by the signatures
        for name in graphs:
            graphs[name] = qdq.insert_input_pairs(graphs[name], pairs[name], ranges[name])
            if self.smooth_quant:
                graphs[name], found[name], ranges[name] = smoothquant.smooth_activations(
                    graphs[name], found[name], ranges[name], self.sq_alpha, scales)

        form = qdq.insert_qdq_pairs if self.itex_mode else int8_matmul.fuse_int8_matmuls
        if self.max_accuracy_drop is not None:
            if not self.holdout_batches:
                raise UserError("the accuracy-aware fallback needs held-out passages")
            trial = weights.Int8Weights(self.per_channel)    # the trials' weights are not kept
            kept = fallback.choose_fp32_sites(
                graphs[SERVING], found[SERVING],
                lambda graph, chosen: form(graph.copy(), chosen, ranges[SERVING], trial),
                self.holdout_batches, self.max_accuracy_drop)
            del trial
            self.kept_in_fp32 = [s.matmul for s in kept]
            log.info("kept in FP32: %s", ", ".join(self.kept_in_fp32) or "none")
            kept = {sites.weight_key(graphs[SERVING], s) for s in kept}
            found = {name: [s for s in found[name] if sites.weight_key(graphs[name], s) not in kept] for name in graphs}

        fused = form is int8_matmul.fuse_int8_matmuls
        timed = fused and (self.kernel_choice is not None or not self.force_int8)
        whole_steps = timed and self.kernel_choice is None
        steps = self._step_inputs(graphs, found, prefill) if timed else None   # while every signature still runs

        # each signature as it is in FP32, to fall back to; timed now, while its weights are all here,
        # unless they may be read back later to be timed beside its int8 step
        fp32_graphs, fp32_ms, every_site = {}, {}, dict(found)
        if whole_steps:
            for name, (inputs, _) in steps.items():
                fp32_graphs[name] = graphs[name].copy()
                if weights.Int8Weights.bytes([graphs[name].feeds[s.weight] for s in found[name]]) > STEP_REFILL_BYTES:
                    fp32_ms[name], = kernel_choice.time_steps([fp32_graphs[name]], inputs)

        # one int8 copy of each weight for all signatures; an FP32 weight no signature reads in FP32 any
        # more is freed as soon as its int8 copy exists, so the conversion never holds both. The
        # embedding tables go first: the kernel timing, the conversion's peak, then runs without them.
        store = weights.Int8Weights(self.per_channel, release=self._int8_only(graphs, {name: [] for name in graphs}))
        for name, graph in graphs.items():
            graphs[name] = weights.quantize_embeddings(graph, sites.find_embeddings(graph), store)

        form_everywhere = int8_matmul.DEFAULT_FORM if self.int8_kernel == "auto" else self.int8_kernel
        forms = {name: {s.activation: form_everywhere for s in found[name]} for name in graphs}
        if timed:
            found, forms = self._choose_kernels(graphs, found, {name: rows for name, (_, rows) in steps.items()})

        store.release |= self._int8_only(graphs, found)
        for name, graph in graphs.items():
            if fused:
                self._log_kernels(name, found[name], forms[name])
                graphs[name] = form(graph, found[name], ranges[name], store, forms[name])
            else:
                log.info("%s: %d MatMuls -> %d int8 QDQ MatMuls", name, len(found[name]), len(found[name]))
                graphs[name] = form(graph, found[name], ranges[name], store)
        if whole_steps:
            self._keep_fastest_steps(graphs, fp32_graphs, fp32_ms, steps, every_site, found, forms, ranges, store)
        del fp32_graphs
        for name, graph in graphs.items():
            graphs[name] = savedmodel.prune(graph)
            dump = "converted_graph_def.pb" if name == SERVING else f"converted_{name}_graph_def.pb"
            savedmodel.write_graph_def(graphs[name].graph_def, self.output_dir / dump)

        side_files = [self.src / f for f in SIDE_FILES if (self.src / f).exists()]
        eos_token_id, n_positions = models.generation_settings(self.src)
        out = savedmodel.save_serving_graph(graphs, self.dst, extra_files=side_files,
                                            eos_token_id=eos_token_id, n_positions=n_positions)
        log.info("wrote %s (%.1f MB; FP32 %.1f MB)", out, savedmodel.saved_model_size(out) / 1e6,
                 savedmodel.saved_model_size(self.src) / 1e6)
        return out

    def _keep_requested_in_fp32(self, graphs, found):
        """`found` without the sites keep_fp32 names, in every signature."""
        patterns = [p.strip() for p in self.keep_fp32.split(",") if p.strip()]
        if not patterns:
            return found
        layers = {sites.module_name(graphs[SERVING], s) for s in found[SERVING]}
        unknown = [p for p in patterns if not any(p in layer for layer in layers)]
        if unknown:
            raise UserError(f"keep_fp32: {', '.join(map(repr, unknown))} names no MatMul; they are named like "
                            f"{', '.join(sorted(layers)[:2])}, ..., lm_head")
        for name, graph in graphs.items():
            found[name], kept = sites.split_by_module(graph, found[name], patterns)
            log.info("%s: FP32 kept for %d MatMuls, as keep_fp32=%r asks", name, len(kept), self.keep_fp32)
        self.kept_by_request = sorted(layers - {sites.module_name(graphs[SERVING], s) for s in found[SERVING]})
        log.info("kept in FP32 by keep_fp32: %s", ", ".join(self.kept_by_request))
        return found

    @staticmethod
    def _int8_only(graphs, found):
        """Ids of the variables that no signature reads but as the weight of one of `found`'s sites
        ({signature: sites}) or as an embedding table: what needs no FP32 value once it is int8."""
        only, other = set(), set()
        for name, graph in graphs.items():
            o, x = sites.int8_only_weights(graph, found[name], sites.find_embeddings(graph))
            only |= o
            other |= x
        return only - other

    def _step_inputs(self, graphs, found, prefill):
        """{signature: (inputs, {activation: rows})}: each signature's inputs for a passage of median
        length (in decode, its last token after the rest), and the rows each MatMul reads there."""
        batch = sorted(self.calibration_batches, key=lambda b: int(b[1].sum()))[len(self.calibration_batches) // 2]
        steps = {}
        for name, graph in graphs.items():
            inputs = next(calibration.decode_batches(prefill, [batch]), None) if name == DECODE else batch
            if found[name] and inputs is not None:   # a passage of one token has no decode step
                inputs = tuple(inputs[:len(graph.inputs)])
                steps[name] = inputs, calibration.activation_rows(graph, [s.activation for s in found[name]], inputs)
        return steps

    def _log_kernels(self, name, found, forms):
        activations = {s.activation for s in found}
        chosen = [forms[a] for a in activations]
        self.kernel_forms[name] = {f: chosen.count(f) for f in int8_matmul.FORMS if f in chosen}
        log.info("%s: %d MatMuls -> %d int8 kernels (%s)", name, len(found), len(activations),
                 ", ".join(f"{n} {f}" for f, n in self.kernel_forms[name].items()) or "none")

    def _keep_fastest_steps(self, graphs, fp32_graphs, fp32_ms, steps, every_site, found, forms, ranges, store):
        """Each signature's whole step as chosen kernel by kernel, against every MatMul int8 (where
        that differs) and against the signature as it is in FP32: the fastest is kept, so that no
        signature is slower than FP32 on this CPU (one that falls back has its MatMuls and embedding
        in FP32 again, their weights stored in FP32 beside the int8 copies other signatures read). Kernels timed one by one
        miss what the step pays besides them: quantizing activations, splits, caches.

        The three are called in turn when the signature's MatMul weights fit STEP_REFILL_BYTES in
        FP32 (those already released are read back from the source model's checkpoint for it); above
        it, where int8 is several times faster, FP32 is the step timed before any weight was
        converted, so that the conversion never holds the FP32 and int8 models together."""
        read = lambda names: savedmodel.read_variables(self.src, names)   # noqa: E731
        for name, (inputs, _) in steps.items():
            candidates = {"as chosen": graphs[name]}
            if len(found[name]) < len(every_site[name]):
                int8 = fp32_graphs[name].copy()
                int8 = weights.quantize_embeddings(int8, sites.find_embeddings(int8), store)
                candidates["all int8"] = int8_matmul.fuse_int8_matmuls(int8, every_site[name], ranges[name], store,
                                                                       forms[name])
            fp32_weights = savedmodel.prune(fp32_graphs[name]).variables()
            refill = name not in fp32_ms
            refilled = store.refill(fp32_weights, read) if refill else []
            if refill:
                candidates["FP32"] = fp32_graphs[name]
            ms = dict(zip(candidates, kernel_choice.time_steps(list(candidates.values()), inputs)))
            if not refill:
                ms["FP32"] = fp32_ms[name]
            best = min(ms, key=ms.get)
            log.info("%s, whole step%s: %s -> %s", name, "" if refill else " (FP32 timed before converting)",
                     ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items()), best)
            if best == "FP32":
                store.refill(fp32_weights, read)   # where they were not read back for the timing
                graphs[name], found[name] = fp32_graphs[name], []
            else:
                store.release_again(refilled)
            if best == "all int8":
                graphs[name], found[name] = candidates[best], every_site[name]
            if best == "as chosen":
                continue
            self.kept_for_speed[name] = sorted({sites.module_name(graphs[name], s) for s in every_site[name]}
                                               - {sites.module_name(graphs[name], s) for s in found[name]})
            self._log_kernels(name, found[name], forms[name])

    def _choose_kernels(self, graphs, found, rows):
        """(`found` without the groups of MatMuls that are faster in FP32, {signature: {activation:
        int8 form, the fastest for each group, kept ones too}}), timed on this CPU at the `rows` of
        each signature (_step_inputs)."""
        timings, int8_weights, forms = {}, set(), {}
        allowed = int8_matmul.FORMS if self.int8_kernel == "auto" else (self.int8_kernel,)
        for name, graph in graphs.items():
            forms[name] = {}
            if name not in rows:
                continue
            if self.kernel_choice is None:
                chosen = kernel_choice.choose_kernels(graph, found[name], rows[name], timings, int8_weights,
                                                      self.per_channel, allowed)
            else:
                chosen = kernel_choice.given_kernels(graph, found[name], rows[name],
                                                     lambda modules, shape: self.kernel_choice(name, modules, shape))
            by_shape = {}
            for activation, (choice, group, shape, timing) in chosen.items():
                forms[name][activation] = (choice if choice != kernel_choice.FP32 else
                                           timing.fastest_form() if timing else int8_matmul.DEFAULT_FORM)
                if choice == kernel_choice.FP32:
                    by_shape.setdefault(shape, []).extend(sites.module_name(graph, s) for s in group)
            for shape, names in by_shape.items():
                log.info("%s: FP32 kept for %d MatMuls of %s, where int8 is slower on this CPU (%s): %s%s",
                         name, len(names), shape, timings.get(shape, "choice given"), ", ".join(names[:3]),
                         f" and {len(names) - 3} more" if len(names) > 3 else "")
            kept = {a for a, (choice, *_) in chosen.items() if choice == kernel_choice.FP32}
            self.kept_for_speed[name] = [n for names in by_shape.values() for n in names]
            found[name] = [s for s in found[name] if s.activation not in kept]
            int8_weights |= {sites.weight_key(graph, s) for s in found[name]}
        return found, forms

    def _calibrate(self, graphs, found, pairs, prefill):
        """{signature: Ranges}. serving_default runs the calibration passages; its MatMul ranges
        serve the same MatMuls (by weight) in prefill and decode, whose other pairs are calibrated
        on their own inputs: the passages, and for decode each passage's last token after the rest."""
        serving = graphs[SERVING]
        tensors = [s.activation for s in found[SERVING]] + [t for _, _, t in pairs[SERVING]]
        ranges = {SERVING: calibration.collect_activation_ranges(serving, tensors, self.calibration_batches)}
        by_weight = {sites.weight_key(serving, s): s.activation for s in found[SERVING]}
        for name in generation.STEPS:
            if name not in graphs:
                continue
            graph = graphs[name]
            batches = (self.calibration_batches if name == PREFILL
                       else calibration.decode_batches(prefill, self.calibration_batches))
            tensors = [t for _, _, t in pairs[name]]
            channels = dict(calibration.collect_activation_ranges(graph, tensors, batches).channels) if tensors else {}
            for site in found[name]:
                key = sites.weight_key(graph, site)
                if key not in by_weight:
                    raise UserError(f"'{name}' multiplies by a weight serving_default does not use ({site.matmul})")
                channels[site.activation] = ranges[SERVING].channels[by_weight[key]]
            ranges[name] = calibration.Ranges(channels)
        return ranges
