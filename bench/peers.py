"""Our FP32 and INT8 SavedModels beside peers: ONNX Runtime and PyTorch, FP32 and dynamic int8.

    pip install -r bench/requirements-peers.txt
    python bench/peers.py            # GPT-J-6B's width with 1 layer, and the bundled model
    python bench/peers.py --fresh    # convert our INT8 models again first

Every peer runs our FP32 model's own weights. transformers' PyTorch GPTJForCausalLM is built from
the config.json beside the FP32 SavedModel and filled from its variables (named by transformers'
own TF-to-PyTorch rule), then wrapped to be called as our signatures are: input_ids,
attention_mask and the KV cache [n_layer, 2, batch, n_head, past, head_dim] in; the new positions'
logits and the cache one call longer out. From it:
- PyTorch dynamic int8: torch.ao.quantization.quantize_dynamic on its nn.Linear layers (qint8
  weights per tensor, activations quantized at each call; the embedding stays FP32).
- ONNX Runtime FP32: the wrapper exported by torch.onnx.export (the TorchScript exporter), one
  graph with the cache as input and output, run with an empty cache for the prompt.
- ONNX Runtime dynamic int8: onnxruntime.quantization.quantize_dynamic on that graph (QInt8
  weights per tensor: its weight MatMuls become MatMulInteger). On a CPU without VNNI with
  reduce_range (7-bit weights), as ONNX Runtime advises there: its AVX2 kernel multiplies u8 by s8
  in pairs that saturate 16 bits, which full-range weights reach. Our converter (128 activation
  levels on every CPU) and PyTorch (7-bit activations on x86) take the same care.

Batch 1, two measurements. Prefill: one call on 128 tokens that returns every position's logits
(our serving_default, as bench/speed.py times it). Next token: one step after those 128 tokens,
given their KV cache (our decode signature). Rows are called in turn, call by call, after a
warm-up (benchmark.time_models); medians of --iterations calls. Threads: TensorFlow's default (one
per core); torch.set_num_threads and ONNX Runtime's intra_op_num_threads set to the core count,
ONNX Runtime's idle threads not spinning, so that they do not slow the row called next. The
printout says what share of the CPU other processes took while each model was timed: PyTorch's
times suffer most from them (the bundled model's prefill took 25 ms with 5% taken, 860 ms with 49%).

Fidelity, on --prompts other prompts of 128 tokens and the token that follows each: every int8 row
against its own FP32 row, every peer's FP32 row against ours; logit cosine and argmax agreement
over every position of the prompts, of their last position alone, and of the next-token step
(the cache path), and the largest logit difference.

One process holds all six rows of a model: at GPT-J-6B's width with 1 layer its peak RSS is about
15.4 GB. The ONNX graphs are written to a temporary folder under bench/runs/ and removed after.
"""
import argparse
import functools
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("USE_TF", "AUTO")   # transformers' PyTorch GPT-J is a peer here
import common
from gptj_int8 import benchmark, cli, generation

try:
    import onnxruntime as ort
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
except ImportError as e:
    print(f"error: bench/peers.py needs {e.name}: pip install -r bench/requirements-peers.txt", file=sys.stderr)
    sys.exit(2)

log = logging.getLogger("peers")

MODELS = [("gptj-6b-width-1l", 1), ("bundled-gptj-kjv", None)]
# row -> the row it is measured against for fidelity
ROWS = {"ours FP32": None, "ours INT8": "ours FP32",
        "ONNX Runtime FP32": "ours FP32", "ONNX Runtime dynamic int8": "ONNX Runtime FP32",
        "PyTorch FP32": "ours FP32", "PyTorch dynamic int8": "PyTorch FP32"}
PROMPT = 128
THREADS = os.cpu_count()
# Without VNNI, ONNX Runtime's u8 x s8 kernel adds pairs of products in 16 bits, which full-range
# weights can saturate: it advises 7-bit weights (reduce_range) there.
VNNI = bool(cli.cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


##### The rows: one interface, as our signatures are called #####
# serve(input_ids, attention_mask) -> {"logits": [batch, seq, vocab]}; cache(...) -> the KV cache;
# decode(input_ids, attention_mask, past_key_values) -> {"logits": [batch, vocab]}. Inputs may be
# tf or numpy int32; every "logits" has .numpy(), as benchmark.time_models reads it.


class SavedModelRow:
    def __init__(self, model_dir):
        import tensorflow as tf
        common.check_memory(model_dir)
        self.loaded = tf.saved_model.load(str(model_dir))
        self.serve = self.loaded.signatures[generation.SERVING]
        self.decode = self.loaded.signatures[generation.DECODE]

    def cache(self, input_ids, attention_mask):
        return self.loaded.signatures[generation.PREFILL](
            input_ids=input_ids, attention_mask=attention_mask)[generation.CACHE]


class Step(torch.nn.Module):
    """A GPTJForCausalLM called as our signatures are: the position of each token is the count of
    real tokens before it, the cache is one tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, past_key_values):
        from transformers import DynamicCache
        positions = (attention_mask.cumsum(-1) - attention_mask)[:, -input_ids.shape[1]:]
        cache = DynamicCache.from_legacy_cache([(kv[0], kv[1]) for kv in past_key_values])
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                         past_key_values=cache, use_cache=True)
        return out.logits, torch.stack([torch.stack(kv) for kv in out.past_key_values.to_legacy_cache()])


def zero_cache(config, batch, past=0):
    """A cache of `past` positions, in our layout; with none, what a prompt starts from."""
    return np.zeros([config.n_layer, 2, batch, config.n_head, past, config.n_embd // config.n_head], np.float32)


def _long(x):
    return torch.from_numpy(np.asarray(x, np.int64))


class TorchRow:
    def __init__(self, model):
        self.step, self.config = Step(model), model.config

    @torch.inference_mode()
    def _run(self, input_ids, attention_mask, past_key_values=None):
        past = zero_cache(self.config, len(input_ids)) if past_key_values is None else past_key_values
        return self.step(_long(input_ids), _long(attention_mask), torch.as_tensor(past))

    def serve(self, input_ids, attention_mask):
        return {"logits": self._run(input_ids, attention_mask)[0]}

    def cache(self, input_ids, attention_mask):
        return self._run(input_ids, attention_mask)[1]

    def decode(self, input_ids, attention_mask, past_key_values):
        return {"logits": self._run(input_ids, attention_mask, past_key_values)[0][:, -1]}


class OrtRow:
    def __init__(self, path, config):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = config

    def _run(self, outputs, input_ids, attention_mask, past_key_values=None):
        past = zero_cache(self.config, len(input_ids)) if past_key_values is None else past_key_values
        return self.session.run(outputs, {"input_ids": np.asarray(input_ids, np.int64),
                                          "attention_mask": np.asarray(attention_mask, np.int64),
                                          "past_key_values": np.asarray(past)})

    def serve(self, input_ids, attention_mask):
        return {"logits": torch.from_numpy(self._run(["logits"], input_ids, attention_mask)[0])}

    def cache(self, input_ids, attention_mask):
        return self._run(["present"], input_ids, attention_mask)[0]

    def decode(self, input_ids, attention_mask, past_key_values):
        logits = self._run(["logits", "present"], input_ids, attention_mask, past_key_values)[0]
        return {"logits": torch.from_numpy(logits[:, -1])}


##### Peers from our FP32 weights #####


def torch_gptj(fp32_dir, variables):
    """transformers' PyTorch GPT-J of the config beside `fp32_dir`, filled from the SavedModel's
    variables: every parameter, each once."""
    from transformers import GPTJConfig, GPTJForCausalLM
    from transformers.modeling_tf_pytorch_utils import apply_transpose, convert_tf_weight_name_to_pt_weight_name
    from transformers.modeling_utils import no_init_weights
    with no_init_weights():   # every weight is overwritten: drawing random ones first costs minutes at 6B's width
        model = GPTJForCausalLM(GPTJConfig.from_pretrained(fp32_dir))
    unfilled = dict(model.named_parameters())
    with torch.no_grad():
        for v in variables:
            name, transpose = convert_tf_weight_name_to_pt_weight_name(v.name, tf_weight_shape=v.shape)
            if name not in unfilled:
                raise RuntimeError(f"{v.name} maps to {name}: no parameter of GPTJForCausalLM left of that name")
            unfilled.pop(name).copy_(torch.from_numpy(apply_transpose(transpose, v.numpy(), pt_to_tf=False)))
    if unfilled:
        raise RuntimeError(f"no variable of the SavedModel fills {', '.join(unfilled)}")
    return model.eval()


def export_onnx(model, path):
    """The Step wrapper as one ONNX graph, with the batch, the new tokens and the cache's length dynamic."""
    cfg = model.config
    example = (torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 7, dtype=torch.long),
               torch.from_numpy(zero_cache(cfg, 1, 4)))
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on the cache's Python bookkeeping; the graph is checked by its logits
        warnings.simplefilter("ignore")
        torch.onnx.export(Step(model), example, str(path), dynamo=False,
                          input_names=["input_ids", "attention_mask", "past_key_values"],
                          output_names=["logits", "present"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "new"}, "attention_mask": {0: "batch", 1: "all"},
                                        "past_key_values": {2: "batch", 4: "past"},
                                        "logits": {0: "batch", 1: "new"}, "present": {2: "batch", 4: "all"}})


def torch_dynamic_int8(model):
    from torch.ao.quantization import quantize_dynamic as torch_quantize_dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.ao.quantization's deprecation notices
        return torch_quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def build_rows(fp32_dir, int8_dir, folder):
    """{row name: row} in ROWS order; the ONNX graphs are written to `folder`."""
    rows = {"ours FP32": SavedModelRow(fp32_dir), "ours INT8": SavedModelRow(int8_dir)}
    model = torch_gptj(fp32_dir, rows["ours FP32"].loaded.weights)
    fp32_onnx, int8_onnx = folder / "gptj.onnx", folder / "gptj-int8.onnx"
    log.info("exporting to ONNX, then quantize_dynamic")
    export_onnx(model, fp32_onnx)
    # without its advice to pre-process the graph first: its shape inference cannot complete this graph
    logging.disable(logging.WARNING)
    quantize_dynamic(fp32_onnx, int8_onnx, weight_type=QuantType.QInt8, reduce_range=not VNNI,
                     use_external_data_format=True)
    logging.disable(logging.NOTSET)
    rows["ONNX Runtime FP32"] = OrtRow(fp32_onnx, model.config)
    rows["ONNX Runtime dynamic int8"] = OrtRow(int8_onnx, model.config)
    rows["PyTorch FP32"] = TorchRow(model)
    rows["PyTorch dynamic int8"] = TorchRow(torch_dynamic_int8(model))
    return rows


##### Measuring #####


def prompts_and_next(model_dir, n, start):
    """(prompt ids [n, PROMPT], their mask, the token after each [n, 1], the mask one longer)."""
    windows = np.array(common.token_windows(model_dir, n, PROMPT + 1, start), np.int32)
    return windows[:, :-1], np.ones([n, PROMPT], np.int32), windows[:, -1:], np.ones([n, PROMPT + 1], np.int32)


def time_rows(rows, model_dir, warmup, iterations):
    """{row: (prefill ms, next-token ms)}: medians, rows called in turn."""
    ids, mask, following, longer = prompts_and_next(model_dir, 1, 0)
    prefill = benchmark.time_models([r.serve for r in rows.values()], [(ids, mask)], warmup, iterations)
    decode = [functools.partial(r.decode, past_key_values=r.cache(ids, mask)) for r in rows.values()]
    following = benchmark.time_models(decode, [(following, longer)], warmup, iterations)
    return {name: (common.median_ms(a), common.median_ms(b)) for name, a, b in zip(rows, prefill, following)}


def others_cpu_share(fn):
    """(fn(), the share of the machine's CPU time that other processes used while it ran)."""
    import psutil
    me = psutil.Process()
    busy = lambda t: t.user + t.nice + t.system + t.irq + t.softirq
    own = lambda t: t.user + t.system
    start, machine, mine = time.perf_counter(), psutil.cpu_times(), me.cpu_times()
    result = fn()
    others = (busy(psutil.cpu_times()) - busy(machine)) - (own(me.cpu_times()) - own(mine))
    return result, max(0.0, others) / ((time.perf_counter() - start) * THREADS)


def row_outputs(row, batch):
    """(every position's logits of the prompts, the next-token step's logits) of one row."""
    ids, mask, following, longer = batch
    full = row.serve(input_ids=ids, attention_mask=mask)["logits"].numpy()
    step = row.decode(input_ids=following, attention_mask=longer, past_key_values=row.cache(ids, mask))
    return full, step["logits"].numpy()


def agreement(got, want):
    """(logit cosine, argmax agreement, largest |difference|) of two logit arrays."""
    return (benchmark.logit_cosine(got, want), benchmark.argmax_agreement(got, want),
            float(np.abs(got - want).max()))


def fidelity(rows, model_dir, n_prompts):
    """{row: {"all", "last", "next": agreement(...)}} against each row's reference in ROWS."""
    batch = prompts_and_next(model_dir, n_prompts, PROMPT + 1)   # text after the timing prompt
    outputs = {name: row_outputs(row, batch) for name, row in rows.items()}
    found = {}
    for name, ref in ROWS.items():
        if ref:
            (full, step), (ref_full, ref_step) = outputs[name], outputs[ref]
            found[name] = {"all": agreement(full, ref_full), "last": agreement(full[:, -1], ref_full[:, -1]),
                           "next": agreement(step, ref_step)}
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8, help="prompts of the fidelity check")
    p.add_argument("--models", nargs="+", default=[name for name, _ in MODELS], help="a subset of the models")
    p.add_argument("--fresh", action="store_true", help="convert our INT8 models again even if they exist")
    args = p.parse_args()
    torch.set_num_threads(THREADS)

    times, checks, others = {}, {}, {}
    for name, n_layer in [m for m in MODELS if m[0] in args.models]:
        fp32_dir, int8_dir = common.prepare(name, n_layer), common.converted(name, args.fresh)
        with tempfile.TemporaryDirectory(dir=common.RUNS, prefix=f"onnx_{name}_") as folder:
            rows = build_rows(fp32_dir, int8_dir, Path(folder))
            log.info("%s: fidelity on %d prompts", name, args.prompts)
            checks[name] = fidelity(rows, fp32_dir, args.prompts)
            log.info("%s: timing", name)
            times[name], others[name] = others_cpu_share(functools.partial(time_rows, rows, fp32_dir, args.warmup, args.iterations))
            del rows

    print(f"\nCPU: {cli.cpu_name()}")
    print(f"Threads: {THREADS} (TensorFlow's default; torch.set_num_threads, ONNX Runtime intra_op_num_threads). "
          f"Batch 1; prefill: {PROMPT} tokens, every position's logits; next token: one step after them with "
          f"their KV cache. Medians of {args.iterations} calls, rows in turn. ONNX Runtime int8 "
          f"{'without' if VNNI else 'with'} reduce_range. Other processes used "
          + ", ".join(f"{share:.0%} of the CPU while {name} was timed" for name, share in others.items()) + ".\n")
    print("| model | row | prefill ms | next token ms | prefill speed-up vs our FP32 | next-token speed-up vs our FP32 |")
    print("|---|---|---|---|---|---|")
    for name, by_row in times.items():
        base_prefill, base_next = by_row["ours FP32"]
        for row, (prefill, following) in by_row.items():
            print(f"| {name} | {row} | {prefill:.1f} | {following:.2f} | {base_prefill / prefill:.2f}x "
                  f"| {base_next / following:.2f}x |")

    print(f"\nFidelity on {args.prompts} prompts of {PROMPT} tokens (cosine / argmax agreement; max |diff| of logits):\n")
    print("| model | row | against | every position | last position | next-token step | max abs diff (all / next) |")
    print("|---|---|---|---|---|---|---|")
    for name, by_row in checks.items():
        for row, found in by_row.items():
            cells = " | ".join(f"{found[k][0]:.5f} / {found[k][1]:.3f}" for k in ("all", "last", "next"))
            print(f"| {name} | {row} | {ROWS[row]} | {cells} | {found['all'][2]:.2e} / {found['next'][2]:.2e} |")


if __name__ == "__main__":
    cli.run(main)
