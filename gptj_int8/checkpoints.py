"""GPT-J checkpoints saved by transformers' PyTorch classes, read into TFGPTJForCausalLM without torch.

transformers' TF classes load PyTorch-layout weights only through torch. Nearly every GPT-J on the
hub is `model.safetensors` (or shards of it) in that layout, in float32, float16 or bfloat16; this
module reads them with the `safetensors` package's numpy API, maps each PyTorch name to the TF
variable it fills, and assigns the weights block by block into the variables of a built model, so
memory stays near one copy of the FP32 model whatever the checkpoint's size or dtype.

Everything a checkpoint can get wrong (missing files, truncated shards, another architecture,
names or shapes that do not fit its config) is found by `locate_checkpoint` from the files'
headers, before the model is built.
"""
import contextlib
import dataclasses
import json
import os
import struct
from pathlib import Path

import numpy as np
import tensorflow as tf

from .cli import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"
TF_WEIGHTS = "tf_model.h5"
PYTORCH_INDEX = "pytorch_model.bin.index.json"
PYTORCH = "pytorch_model.bin"
# preference order where a checkpoint ships several formats: safetensors loads in bounded memory
WEIGHT_FILES = (SAFETENSORS_INDEX, SAFETENSORS, TF_WEIGHTS, PYTORCH_INDEX, PYTORCH)

# numpy dtypes of the safetensors dtypes we widen to float32; BF16 has none (read as raw bits)
FLOAT_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
# PyTorch GPT-J's buffers, written by older transformers versions: not weights, recomputed by TF
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
BLOCK_ELEMENTS = 1 << 24          # 64 MB of float32 per assigned block


@dataclasses.dataclass
class StoredTensor:
    """Where one tensor's bytes are in a safetensors file."""
    file: Path
    dtype: str                 # safetensors dtype: F32, F16, BF16
    shape: tuple
    offset: int                # of its first byte from the start of the file


@dataclasses.dataclass
class Checkpoint:
    """A located GPT-J checkpoint: its config and the format and files of its weights."""
    source: str
    revision: str
    config: object             # GPTJConfig
    format: str                # "safetensors", "tf" or "pytorch"
    tensors: dict = dataclasses.field(default_factory=dict)   # PyTorch name -> StoredTensor (safetensors)

    def describe(self):
        if self.format != "safetensors":
            return {"tf": TF_WEIGHTS, "pytorch": "pytorch_model.bin (through torch)"}[self.format]
        dtypes = sorted({t.dtype for name, t in self.tensors.items() if not name.endswith(IGNORED_SUFFIXES)})
        files = sorted({t.file.name for t in self.tensors.values()})
        return f"safetensors ({', '.join(dtypes)}; {len(files)} file{'s' if len(files) > 1 else ''})"


# ----- finding the files: a local folder or a hub id -----

def _is_local(source):
    return os.path.isdir(source) or source.startswith((".", "/", "~")) or os.path.exists(source)


def _hub_file(source, filename, revision, required=False):
    """Local path of `filename` of hub repo `source` (downloaded into the hub cache), or None.
    Asked for a file it may lack, transformers answers None for an unreachable hub too: ask for a
    `required` one first, so that being offline is said as such."""
    from transformers.utils import cached_file
    try:
        return cached_file(source, filename, revision=revision,
                           _raise_exceptions_for_missing_entries=required)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot fetch {filename} of {source}: {str(e).splitlines()[0]}")


def _hub_has_file(source, filename, revision):
    from huggingface_hub import file_exists
    try:
        return file_exists(source, filename, revision=revision)
    except Exception as e:   # the hub client raises HTTP, connection and offline-mode errors
        raise UserError(f"cannot look up {filename} of {source}: {str(e).splitlines()[0]}")


def _file_getter(source, revision):
    """get(filename, download=True) -> local Path (or True when not downloaded) or None, for a
    local folder or a hub id."""
    if _is_local(source):
        folder = Path(source).expanduser()
        if not folder.exists():
            raise UserError(f"model folder not found: {source}")
        if not folder.is_dir():
            raise UserError(f"expected a model folder, got a file: {source}")
        if revision:
            raise UserError(f"--revision applies to hub ids, not to the local folder {source}")
        return lambda name, download=True: (folder / name) if (folder / name).is_file() else None

    def get(name, download=True):
        if not download:
            return True if _hub_has_file(source, name, revision) else None
        path = _hub_file(source, name, revision, required=name == "config.json")
        return Path(path) if path else None
    return get


def gptj_config(config_file, source):
    """The GPTJConfig of a checkpoint's config.json, refusing other architectures."""
    from transformers import GPTJConfig
    if config_file is None:
        raise UserError(f"no config.json in {source}")
    try:
        config = json.loads(Path(config_file).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config_file} is not a JSON config: {e}")
    if not isinstance(config, dict):
        raise UserError(f"{config_file} is not a JSON object")
    if config.get("model_type") != "gptj":
        raise UserError(f"{source} is not a GPT-J: its config.json has model_type "
                        f"{config.get('model_type')!r}, not 'gptj'")
    try:
        return GPTJConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise UserError(f"{config_file} is not a valid GPT-J config: {e}")


def locate_checkpoint(source, revision=None):
    """The checkpoint at `source` (local folder or hub id), its safetensors headers checked against
    its config. Nothing heavy is read; a broken checkpoint fails here, before any model is built."""
    source = str(source)
    get = _file_getter(source, revision)
    config = gptj_config(get("config.json"), source)
    for name in WEIGHT_FILES:
        # transformers' from_pretrained fetches TF and pickle weights itself: only look for them
        path = get(name, download=name in (SAFETENSORS_INDEX, SAFETENSORS))
        if path is None:
            continue
        if name == SAFETENSORS_INDEX:
            tensors = _sharded_tensors(path, get)
        elif name == SAFETENSORS:
            tensors = safetensors_header(path)
        elif name == TF_WEIGHTS:
            return Checkpoint(source, revision, config, "tf")
        elif not torch_available():
            raise UserError(f"{source} has only {name}, which needs torch to read: pip install torch, or "
                            f"convert it once where torch is: GPTJForCausalLM.from_pretrained(...)"
                            f".save_pretrained(folder) writes model.safetensors")
        else:
            return Checkpoint(source, revision, config, "pytorch")
        check_tensors(tensors, config)
        return Checkpoint(source, revision, config, "safetensors", tensors)
    if get("saved_model.pb", download=False):
        raise UserError(f"{source} is a SavedModel (prepare_model.py's output), not a GPT-J checkpoint")
    raise UserError(f"no weights in {source}: expected one of {', '.join(WEIGHT_FILES)}")


# ----- safetensors headers -----

def safetensors_header(path):
    """PyTorch name -> StoredTensor for every tensor of one safetensors file, its layout checked
    against the file's size (a truncated download fails here, not halfway through loading)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise UserError(f"{path} is not a safetensors file (or is truncated): its header "
                            f"length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path} is not a safetensors file: its header is not JSON")
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file: its header is not a JSON object")
    tensors, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path} is not a safetensors file: bad header entry for {name}")
        end = max(end, stop)
        tensors[name] = StoredTensor(path, dtype, shape, 8 + n + begin)
        item = FLOAT_DTYPES[dtype].itemsize if dtype in FLOAT_DTYPES else None
        if item is not None and stop - begin != item * int(np.prod(shape)):
            raise UserError(f"{path}: tensor {name} has {stop - begin} bytes for shape {list(shape)} {dtype}")
    if 8 + n + end != size:
        raise UserError(f"{path} is truncated or corrupt: its header describes {8 + n + end} bytes, "
                        f"the file has {size}")
    return tensors


def _sharded_tensors(index_file, get):
    """The tensors of every shard named by a model.safetensors.index.json."""
    try:
        weight_map = json.loads(Path(index_file).read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index_file} is not a safetensors index (no weight_map): {e}")
    tensors = {}
    for shard in shards:
        path = get(shard)
        if path is None:
            raise UserError(f"shard {shard} named by {index_file} is missing")
        tensors.update(safetensors_header(path))
    for name, shard in weight_map.items():
        if name not in tensors or tensors[name].file.name != Path(shard).name:
            raise UserError(f"{index_file} places tensor {name} in {shard}, which does not hold it")
    return tensors


# ----- PyTorch names and layouts -> TF variables -----

def pytorch_layout(config):
    """PyTorch name -> (shape in the checkpoint, path of the TF variable, transposed?) for a
    GPTJForCausalLM of `config`. nn.Linear stores [out, in], Keras Dense [in, out]; embeddings and
    LayerNorm parameters have the same layout in both."""
    d, vocab = config.n_embd, config.vocab_size
    inner = config.n_inner if config.n_inner is not None else 4 * d
    layout = {"transformer.wte.weight": ((vocab, d), ("transformer", "wte", "weight"), False)}
    for i in range(config.n_layer):
        pt, tf_ = f"transformer.h.{i}.", ("transformer", ("h", i))
        layout[pt + "ln_1.weight"] = ((d,), (*tf_, "ln_1", "gamma"), False)
        layout[pt + "ln_1.bias"] = ((d,), (*tf_, "ln_1", "beta"), False)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            layout[pt + f"attn.{proj}.weight"] = ((d, d), (*tf_, "attn", proj, "kernel"), True)
        layout[pt + "mlp.fc_in.weight"] = ((inner, d), (*tf_, "mlp", "fc_in", "kernel"), True)
        layout[pt + "mlp.fc_in.bias"] = ((inner,), (*tf_, "mlp", "fc_in", "bias"), False)
        layout[pt + "mlp.fc_out.weight"] = ((d, inner), (*tf_, "mlp", "fc_out", "kernel"), True)
        layout[pt + "mlp.fc_out.bias"] = ((d,), (*tf_, "mlp", "fc_out", "bias"), False)
    layout["transformer.ln_f.weight"] = ((d,), ("transformer", "ln_f", "gamma"), False)
    layout["transformer.ln_f.bias"] = ((d,), ("transformer", "ln_f", "beta"), False)
    layout["lm_head.weight"] = ((vocab, d), ("lm_head", "kernel"), True)
    layout["lm_head.bias"] = ((vocab,), ("lm_head", "bias"), False)
    return layout


def _source_name(name, tensors, config):
    """The stored tensor that fills `name`: a tied lm_head reads the embedding."""
    if name == "lm_head.weight" and name not in tensors and getattr(config, "tie_word_embeddings", False):
        return "transformer.wte.weight"
    return name


def check_tensors(tensors, config):
    """Every tensor the config needs is there, with its shape and a float dtype; nothing else is."""
    layout = pytorch_layout(config)
    for name, (shape, _, _) in layout.items():
        stored = tensors.get(_source_name(name, tensors, config))
        if stored is None:
            raise UserError(f"tensor {name} is missing from the checkpoint (n_layer={config.n_layer} "
                            f"in its config.json)")
        if stored.shape != shape:
            raise UserError(f"tensor {name} in {stored.file.name} has shape {list(stored.shape)}; "
                            f"config.json needs {list(shape)}")
        if stored.dtype not in FLOAT_DTYPES:
            raise UserError(f"tensor {name} in {stored.file.name} is {stored.dtype}; "
                            f"expected one of {', '.join(FLOAT_DTYPES)}")
    for name, stored in tensors.items():
        if name not in layout and not name.endswith(IGNORED_SUFFIXES):
            raise UserError(f"tensor {name} in {stored.file.name} is not a weight of a GPT-J with "
                            f"n_layer={config.n_layer}")


def read_rows(stored, name, start, stop):
    """Rows start:stop of a stored tensor as float32 (the whole tensor for 1-D ones)."""
    if stored.dtype == "BF16":
        # numpy has no bfloat16: a bf16 is the high half of the float32 with the same bits
        row = int(np.prod(stored.shape[1:]))
        raw = np.fromfile(stored.file, dtype="<u2", count=(stop - start) * row,
                          offset=stored.offset + start * row * 2)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape((stop - start, *stored.shape[1:]))
    from safetensors import SafetensorError, safe_open
    try:
        # opened per block: a mapping held open keeps every page read so far in this process's RSS
        with safe_open(str(stored.file), framework="np") as f:
            block = f.get_slice(name)[start:stop]
    except (SafetensorError, OSError) as e:
        raise UserError(f"cannot read tensor {name} from {stored.file}: {e}")
    return block.astype(np.float32, copy=False)


def _variable(model, path):
    obj = model
    for step in path:
        obj = getattr(obj, step[0])[step[1]] if isinstance(step, tuple) else getattr(obj, step)
    return obj


def _assign_block(variable, begin, end, value):
    # the raw op, not `variable[a:b].assign(...)`: that form reads the variable first, and the live
    # read makes TensorFlow copy the whole variable before writing the block (at lm_head's size
    # 0.8 GB and a second per block)
    tf.raw_ops.ResourceStridedSliceAssign(ref=variable.handle, begin=list(begin), end=list(end),
                                          strides=[1, 1], value=value)


def assign_weights(model, checkpoint):
    """Fill a built TFGPTJForCausalLM's variables from the checkpoint's safetensors, block by block:
    peak memory is the model plus one block, whatever the checkpoint's dtype or shard sizes."""
    from tqdm import tqdm
    layout = pytorch_layout(checkpoint.config)
    filled = set()
    total = sum(int(np.prod(shape)) for shape, _, _ in layout.values())
    with tqdm(total=total, unit="weight", unit_scale=True, desc="loading weights") as bar:
        for name, (shape, path, transposed) in layout.items():
            source = _source_name(name, checkpoint.tensors, checkpoint.config)
            stored = checkpoint.tensors[source]
            variable = _variable(model, path)
            want = tuple(reversed(shape)) if transposed else shape
            if tuple(variable.shape) != want:
                raise RuntimeError(f"{variable.name} has shape {variable.shape}, layout says {want}")
            if len(shape) == 1:
                variable.assign(read_rows(stored, source, 0, shape[0]))
            else:
                step = max(1, BLOCK_ELEMENTS // shape[1])
                for start in range(0, shape[0], step):
                    stop = min(shape[0], start + step)
                    block = read_rows(stored, source, start, stop)
                    if transposed:   # rows of an nn.Linear weight are columns of the Dense kernel
                        _assign_block(variable, (0, start), (shape[1], stop), tf.transpose(block))
                    else:
                        _assign_block(variable, (start, 0), (stop, shape[1]), block)
                    del block
            filled.add(variable.ref())
            bar.update(int(np.prod(shape)))
    unfilled = [v.name for v in model.variables if v.ref() not in filled]
    if unfilled:
        raise RuntimeError(f"no checkpoint tensor maps to {', '.join(unfilled)}")


@contextlib.contextmanager
def _zero_initial_weights():
    """transformers' TF GPT-J draws every weight from a truncated normal while it builds. The
    checkpoint overwrites them all: at GPT-J-6B's size the draw costs minutes and transient copies
    of the largest tensors, so build with zeros instead."""
    import transformers.modeling_tf_utils as tf_utils
    import transformers.models.gptj.modeling_tf_gptj as tf_gptj
    saved = tf_utils.get_initializer, tf_gptj.get_initializer
    zeros = lambda *_: tf_utils.keras.initializers.Zeros()
    tf_utils.get_initializer = tf_gptj.get_initializer = zeros
    try:
        yield
    finally:
        tf_utils.get_initializer, tf_gptj.get_initializer = saved


def gptj_from_safetensors(checkpoint):
    """A built TFGPTJForCausalLM holding the checkpoint's weights in float32."""
    from transformers import TFGPTJForCausalLM
    with _zero_initial_weights():
        model = TFGPTJForCausalLM(checkpoint.config)
        model(tf.constant([[0, 1]], tf.int32))   # builds the variables, which the checkpoint then fills
    assign_weights(model, checkpoint)
    return model


def torch_available():
    import importlib.util
    return importlib.util.find_spec("torch") is not None
