"""Load a SavedModel's serving_default as one inlined GraphDef whose weights stay variables,
and rebuild a SavedModel from such a graph.

A `ServingGraph` is the currency of the pipeline: the GraphDef, the names of its two inputs and
its logits tensor, and `feeds`, which binds each captured placeholder of the graph to the
variable (or small constant) it stands for. Weights never enter the protobuf, so a model of any
size fits, and swapping a weight for its int8 form is a change of `feeds`.
"""
import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path

import psutil
import tensorflow as tf
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2, trackable_object_graph_pb2
from tensorflow.python.grappler import tf_optimizer

from . import generation
from .cli import UserError
from .graph import make_node, make_resource_placeholder, node_name

log = logging.getLogger(__name__)

SIGNATURE = "serving_default"
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"


@dataclasses.dataclass
class ServingGraph:
    graph_def: tf.compat.v1.GraphDef
    inputs: dict            # input key -> placeholder node name, in the signature's order
    outputs: dict           # output key -> tensor name
    feeds: dict             # placeholder node name -> tf.Variable or tf.Tensor
    specs: list = None      # TensorSpec of each input (default: int32 [batch, seq])

    def __post_init__(self):
        if self.specs is None:
            self.specs = [generation.token_spec(k) for k in self.inputs]

    @property
    def output(self):
        """The logits tensor."""
        return self.outputs[OUTPUT]

    def function(self, fetches=None):
        """A tf.function of the inputs (in order) -> list of `fetches` (default: every output)."""
        fetches = [f if ":" in f else f"{f}:0" for f in (fetches or list(self.outputs.values()))]
        graph_def = self.graph_def
        feeds = dict(self.feeds)
        placeholders = list(self.inputs.values())

        @tf.function(input_signature=list(self.specs), autograph=False)
        def run(*args):
            input_map = {f"{name}:0": tf.identity(v.handle if isinstance(v, tf.Variable) else v)
                         for name, v in feeds.items()}
            input_map.update({f"{name}:0": arg for name, arg in zip(placeholders, args)})
            return tf.graph_util.import_graph_def(graph_def, input_map=input_map,
                                                  return_elements=fetches, name="model")
        return run

    def serving_fn(self):
        """The graph as a signature function: fn(**inputs) -> {output key: tensor}."""
        run = self.function()
        keys, outputs = list(self.inputs), list(self.outputs)
        return lambda **kw: dict(zip(outputs, run(*[kw[k] for k in keys])))

    def copy(self):
        graph_def = tf.compat.v1.GraphDef()
        graph_def.CopyFrom(self.graph_def)
        return dataclasses.replace(self, graph_def=graph_def, feeds=dict(self.feeds))

    def variables(self):
        return [v for v in self.feeds.values() if isinstance(v, tf.Variable)]


def matmul_graph(x, w, bias=None):
    """The smallest graph the converter works on: x @ w (+ bias), x a constant, w (and bias) held
    in variables, behind the two inputs every ServingGraph has (unused here). `w` and `bias` may
    be lists: one MatMul (+ BiasAdd, where its bias is not None) each, all reading x; the first
    output is `logits`, the others `logits_1`, `logits_2`, ... A weight or bias that is already a
    tf.Variable is read as it is, not copied."""
    weights = w if isinstance(w, list) else [w]
    biases = bias if isinstance(bias, list) else [bias] + [None] * (len(weights) - 1)
    nodes = [make_node("Placeholder", name, [], dtype=tf.int32) for name in INPUTS]
    nodes.append(make_node("Placeholder", "x", [], dtype=tf.float32))
    feeds, outputs = {"x": tf.constant(x)}, {}
    for i, (w_i, b_i) in enumerate(zip(weights, biases)):
        suffix = str(i) if len(weights) > 1 else ""
        nodes += [make_resource_placeholder(f"w{suffix}"),
                  make_node("ReadVariableOp", f"w{suffix}/read", [f"w{suffix}"], dtype=tf.float32),
                  make_node("MatMul", f"mm{suffix}", ["x", f"w{suffix}/read"], T=tf.float32,
                            transpose_a=False, transpose_b=False)]
        feeds[f"w{suffix}"] = w_i if isinstance(w_i, tf.Variable) else tf.Variable(w_i)
        out = f"mm{suffix}:0"
        if b_i is not None:
            nodes += [make_resource_placeholder(f"b{suffix}"),
                      make_node("ReadVariableOp", f"b{suffix}/read", [f"b{suffix}"], dtype=tf.float32),
                      make_node("BiasAdd", f"out{suffix}", [f"mm{suffix}", f"b{suffix}/read"], T=tf.float32)]
            feeds[f"b{suffix}"] = b_i if isinstance(b_i, tf.Variable) else tf.Variable(b_i)
            out = f"out{suffix}:0"
        outputs[f"{OUTPUT}_{i}" if i else OUTPUT] = out
    graph_def = tf.compat.v1.GraphDef()
    graph_def.node.extend(nodes)
    return ServingGraph(graph_def, {name: name for name in INPUTS}, outputs, feeds)


def check_saved_model_dir(path):
    path = Path(path)
    if not path.exists():
        raise UserError(f"SavedModel folder not found: {path}")
    if not path.is_dir():
        raise UserError(f"expected a SavedModel folder, got a file: {path}")
    if not (path / "saved_model.pb").exists() and not (path / "saved_model.pbtxt").exists():
        raise UserError(f"not a SavedModel (no saved_model.pb): {path}")


def load_serving_function(path):
    """(loaded object, serving_default concrete function), with the signature checked.

    Keep the loaded object alive as long as the function is used: it owns the variables.
    """
    check_saved_model_dir(path)
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # TF raises many types for corrupt files
        raise UserError(f"cannot load SavedModel {path}: {str(e).splitlines()[0]}")
    check_serving_signature(path, {name: (fn.structured_input_signature[1], fn.structured_outputs)
                                   for name, fn in loaded.signatures.items()})
    return loaded, loaded.signatures[SIGNATURE]


def check_serving_signature(path, signatures):
    """Refuse a model without serving_default, its inputs or its logits; `signatures` is {signature:
    (its input names, its output names)}, of a loaded model or of its SignatureDefs."""
    if SIGNATURE not in signatures:
        raise UserError(f"SavedModel {path} has no '{SIGNATURE}' signature "
                        f"(has: {', '.join(n for n in signatures if not n.startswith('__')) or 'none'})")
    inputs, outputs = signatures[SIGNATURE]
    missing = [k for k in INPUTS if k not in inputs]
    if missing:
        raise UserError(f"'{SIGNATURE}' of {path} lacks input(s) {', '.join(missing)}")
    if OUTPUT not in outputs:
        raise UserError(f"'{SIGNATURE}' of {path} has no '{OUTPUT}' output (has: {', '.join(outputs)})")


def read_signature_defs(path):
    """{name: SignatureDef} of a SavedModel, read from its saved_model.pb without loading the model,
    serving_default checked."""
    from tensorflow.python.saved_model import loader_impl
    check_saved_model_dir(path)
    try:
        defs = dict(loader_impl.parse_saved_model(str(path)).meta_graphs[0].signature_def)
    except Exception as e:  # TF raises many types for corrupt files
        raise UserError(f"cannot load SavedModel {path}: {str(e).splitlines()[0]}")
    check_serving_signature(path, {name: (d.inputs, d.outputs) for name, d in defs.items()})
    return defs


def load_signatures(path):
    """(loaded object, {signature: concrete function}): serving_default, checked, and the
    generation steps (prefill, decode) when the model has them (models exported before they
    existed have serving_default only)."""
    loaded, fn = load_serving_function(path)
    functions = {SIGNATURE: fn}
    steps = [name for name in generation.STEPS if name in loaded.signatures]
    if steps and len(steps) < len(generation.STEPS):
        raise UserError(f"SavedModel {path} has '{steps[0]}' without its pair; re-export it with prepare_model.py")
    for name in steps:
        step = loaded.signatures[name]
        if (set(step.structured_input_signature[1]) != set(generation.INPUTS[name])
                or set(step.structured_outputs) != set(generation.OUTPUTS[name])):
            raise UserError(f"'{name}' of {path} does not take {', '.join(generation.INPUTS[name])} "
                            f"and return {', '.join(generation.OUTPUTS[name])}")
        functions[name] = step
    return loaded, functions


def _inline_functions(fn):
    """Grappler's function inlining alone: one flat GraphDef, variables still read by handle."""
    meta = tf.compat.v1.train.export_meta_graph(graph_def=fn.graph.as_graph_def(), graph=fn.graph)
    fetch = meta_graph_pb2.CollectionDef()
    fetch.node_list.value.extend(t.name for t in fn.outputs)
    meta.collection_def["train_op"].CopyFrom(fetch)
    config = config_pb2.ConfigProto()
    config.graph_options.rewrite_options.min_graph_nodes = -1
    config.graph_options.rewrite_options.optimizers.append("function")
    graph_def = tf_optimizer.OptimizeGraph(config, meta)
    # Debug info names the traced functions by a per-process counter: without it, the same model
    # gives the same graph however many were converted before it in the process.
    for node in graph_def.node:
        node.ClearField("experimental_debug_info")
    return graph_def


def read_variables(path, names):
    """{name: value} of the variables of the SavedModel at `path` with these names, read from its
    checkpoint alone (the model is not loaded): its object graph gives each variable's key."""
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    reader = tf.train.load_checkpoint(str(Path(path) / "variables" / "variables"))
    checkpoint = trackable_object_graph_pb2.TrackableObjectGraph()
    checkpoint.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    # the two object graphs number their nodes alike
    keys = {node.variable.name: checkpoint.nodes[i].attributes[0].checkpoint_key
            for i, node in enumerate(saved.meta_graphs[0].object_graph_def.nodes)
            if node.WhichOneof("kind") == "variable" and checkpoint.nodes[i].attributes}
    return {name: reader.get_tensor(keys[name]) for name in names}


def extract_serving_graph(loaded, fn, signature=SIGNATURE):
    """A signature's function as a ServingGraph (weights bound to the loaded variables)."""
    variables = {id(v.handle): v for v in tf.train.TrackableView(loaded).descendants()
                 if isinstance(v, tf.Variable)}
    # a captured tensor that is no variable (a small constant) is fed as it is
    feeds = {internal.op.name: variables.get(id(external), external) for external, internal in fn.graph.captures}
    graph_def = _inline_functions(fn)
    # a signature's outputs are its dict of tensors flattened in sorted key order
    keys = sorted(fn.structured_outputs)
    outputs = {key: fn.outputs[keys.index(key)].name for key in generation.OUTPUTS.get(signature, keys)}
    specs = fn.structured_input_signature[1]
    inputs = {}
    for key in generation.INPUTS.get(signature, sorted(specs)):
        inputs[key] = next(t.op.name for t in fn.inputs
                           if t.dtype != tf.resource and t.op.name in (specs[key].name, key))
    return ServingGraph(graph_def, inputs, outputs, feeds, [specs[k] for k in inputs])


def prune(graph):
    """Drop every node the outputs do not depend on (e.g. reads of weights replaced by int8).

    Inlining leaves control edges from every variable read (and, in a model saved from a loaded
    one, from every variable handle passed into a nested function) to the function's output; they
    only order reads, and they would keep the replaced FP32 weights alive, so they are not followed
    and not kept. `graph` itself is left as it was."""
    reads = {n.name for n in graph.graph_def.node if n.op == "ReadVariableOp"
             or (n.op == "Identity" and n.attr["T"].type == tf.resource.as_datatype_enum)}
    inputs = {n.name: [i for i in n.input if not (i.startswith("^") and i[1:] in reads)]
              for n in graph.graph_def.node}
    names, stack = set(), [*map(node_name, graph.outputs.values()), *graph.inputs.values()]
    while stack:
        name = stack.pop()
        if name not in names:
            names.add(name)
            stack.extend(node_name(i) for i in inputs[name])
    keep = tf.compat.v1.GraphDef()
    keep.versions.CopyFrom(graph.graph_def.versions)
    keep.library.CopyFrom(graph.graph_def.library)
    for node in graph.graph_def.node:
        if node.name in names:
            kept = keep.node.add()
            kept.CopyFrom(node)
            del kept.input[:]
            kept.input.extend(inputs[node.name])
    return dataclasses.replace(graph, graph_def=keep,
                               feeds={k: v for k, v in graph.feeds.items() if k in names})


def write_graph_def(graph_def, path):
    """Write a GraphDef atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(graph_def.SerializeToString(deterministic=True))
    os.replace(tmp, path)


def read_graph_def(path):
    path = Path(path)
    if path.is_dir():
        raise UserError(f"expected a .pb file, got a folder: {path}")
    if not path.is_file():
        raise UserError(f"graph file not found: {path}")
    graph_def = tf.compat.v1.GraphDef()
    try:
        graph_def.ParseFromString(path.read_bytes())
    except Exception:
        raise UserError(f"not a GraphDef protobuf (truncated or another format): {path}")
    return graph_def


def _remove_stale_temporaries(out_dir):
    """Remove what a killed run (SIGKILL, power loss) left beside `out_dir`: its temporary folder
    carries the pid of the process that wrote it, so only those of dead processes go."""
    for tmp in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            log.info("removing %s, left by an interrupted run", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(out_dir):
    """Yield a temporary folder beside `out_dir`; when the block completes it replaces `out_dir`,
    when it fails (or is interrupted) it is removed and `out_dir` stays as it was."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        tmp.chmod(0o755)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}-old")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _signature_function(graph):
    """A concrete function of the graph's inputs, named as its signature's, returning its dict of outputs."""
    run = graph.function()
    outputs = list(graph.outputs)
    specs = [tf.TensorSpec(spec.shape, spec.dtype, name=key) for key, spec in zip(graph.inputs, graph.specs)]
    return tf.function(lambda *args: dict(zip(outputs, run(*args)))).get_concrete_function(*specs)


def save_serving_graph(graphs, out_dir, extra_files=(), eos_token_id=None, n_positions=None):
    """Rebuild a SavedModel from `graphs` ({signature: ServingGraph}, or one ServingGraph for
    serving_default). With prefill and decode (and the model's EOS and context length), the
    `generate` signature is built over them (generation.generate_signature). Variables shared by
    several graphs are stored once.

    Written through atomic_folder, so a failed run leaves an existing model untouched.
    `extra_files` (tokenizer, config) are copied beside it."""
    if isinstance(graphs, ServingGraph):
        graphs = {SIGNATURE: graphs}
    out_dir = Path(out_dir).resolve()
    variables = list({id(v): v for g in graphs.values() for v in g.variables()}.values())
    released = [v.name for v in variables
                if v.shape.num_elements() and not tf.raw_ops.VariableShape(input=v.handle).numpy().prod()]
    if released:
        raise RuntimeError(f"the converted graph still reads FP32 weights freed after quantization: {released[:3]}")
    need = (sum(v.shape.num_elements() * v.dtype.size for v in variables)
            + sum(g.graph_def.ByteSize() for g in graphs.values()))
    free = shutil.disk_usage(out_dir.parent if out_dir.parent.exists() else Path.cwd()).free
    if need * 1.1 + (64 << 20) > free:
        raise UserError(f"not enough disk space for {out_dir}: about {need / 1e9:.2f} GB needed, "
                        f"{free / 1e9:.2f} GB free")
    with atomic_folder(out_dir) as tmp:
        module = tf.Module()
        module.weights = variables
        signatures = {name: _signature_function(graph) for name, graph in graphs.items()}
        if all(s in graphs for s in generation.STEPS) and eos_token_id is not None and n_positions:
            signatures[generation.GENERATE] = generation.generate_signature(
                signatures[generation.DECODE], eos_token_id, n_positions)
        tf.saved_model.save(module, str(tmp), signatures=signatures)
        for f in extra_files:
            shutil.copy2(f, tmp / Path(f).name)
    return out_dir


def saved_model_size(path):
    """Bytes on disk of a SavedModel folder (graph, variables and everything beside them)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
