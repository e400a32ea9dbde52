"""Where quantization goes: the Dense MatMuls and their weights, the inputs that get QDQ pairs,
the embedding tables; and value numbering, so MatMuls that read the same values read one tensor."""
import dataclasses

import numpy as np
import tensorflow as tf
from tensorflow.python.framework import op_def_registry

from . import generation
from .graph import GraphIndex, Rewriter, node_name


@dataclasses.dataclass
class MatMulSite:
    matmul: str               # the MatMul node
    activation: str           # tensor entering it
    weight: str               # placeholder bound to the FP32 weight variable
    bias_add: str = None      # BiasAdd after the Dense's Tensordot reshape, fused when present
    bias: str = None          # placeholder bound to the bias variable
    row_scale: np.ndarray = None   # SmoothQuant factors, multiplied into the weight's rows


def weight_key(graph, site):
    """What identifies a site across signatures: the weight variable it reads (the same object
    in every signature of one SavedModel)."""
    return id(graph.feeds[site.weight])


def module_name(graph, site):
    """The Dense layer a site belongs to, named as in transformers' GPT-J and the same in every
    signature whatever its graph calls the MatMul: its weight variable's name without the model's
    own scope and `/kernel:0`, e.g. 'transformer/h_._0/attn/q_proj' or 'lm_head'."""
    name = graph.feeds[site.weight].name.split(":")[0].removesuffix("/kernel")
    return name.split("/", 1)[1] if "/" in name else name


def split_by_module(graph, sites, patterns):
    """(sites whose module_name contains none of `patterns`, sites whose module_name contains one)."""
    matched = [any(p in module_name(graph, s) for p in patterns) for s in sites]
    return [s for s, m in zip(sites, matched) if not m], [s for s, m in zip(sites, matched) if m]


def _variable_placeholder(index, graph, tensor):
    """The placeholder bound to a variable behind `tensor` (a ReadVariableOp), else None."""
    read = index.through_identity(tensor)
    if read.op != "ReadVariableOp":
        return None
    holder = index.through_identity(read.input[0])
    return holder.name if isinstance(graph.feeds.get(holder.name), tf.Variable) else None


def find_matmul_sites(graph):
    """Every float MatMul whose second input is a weight variable: the Dense layers."""
    index = GraphIndex(graph.graph_def)
    sites = []
    for node in graph.graph_def.node:
        if (node.op != "MatMul" or node.attr["T"].type != tf.float32.as_datatype_enum
                or node.attr["transpose_a"].b or node.attr["transpose_b"].b):
            continue
        weight = _variable_placeholder(index, graph, node.input[1])
        if weight is None:
            continue
        site = MatMulSite(node.name, node.input[0], weight)
        after = index.consumers[node.name]
        if len(after) == 1 and after[0].op == "Reshape" and len(index.consumers[after[0].name]) == 1:
            after = index.consumers[after[0].name]   # Tensordot: MatMul -> Reshape -> BiasAdd
        if len(after) == 1 and after[0].op == "BiasAdd":
            bias = _variable_placeholder(index, graph, after[0].input[1])
            if bias is not None:
                site.bias_add, site.bias = after[0].name, bias
        sites.append(site)
    return sites


# Ops whose output is not determined by their op, attributes and inputs alone.
_BY_NAME = {"Placeholder", "Merge", "Enter", "Exit", "NextIteration", "Switch", "LoopCond"}


def _value_numbers(index, tensors):
    """A number per node behind `tensors`, equal for nodes that compute the same value: the same
    op and attributes on the same inputs (stateful ops and placeholders are equal only to themselves)."""
    numbers, keys = {}, {}
    stack = [node_name(t) for t in tensors]
    while stack:
        name = stack[-1]
        if name in numbers:
            stack.pop()
            continue
        node = index.nodes[name]
        op_def = op_def_registry.get(node.op)
        by_name = node.op in _BY_NAME or op_def is None or op_def.is_stateful
        inputs = [] if by_name else [i for i in node.input if not i.startswith("^")]
        missing = [node_name(i) for i in inputs if node_name(i) not in numbers]
        if missing:
            stack.extend(missing)
            continue
        stack.pop()
        attrs = tuple(sorted((k, v.SerializeToString(deterministic=True))
                             for k, v in node.attr.items() if not k.startswith("_")))
        key = (node.op, attrs, name if by_name else tuple(_tensor_number(numbers, i) for i in inputs))
        numbers[name] = keys.setdefault(key, len(keys))
    return numbers


def _tensor_number(numbers, tensor):
    """A tensor's value: its node's value number and which output it is ('a' is 'a:0')."""
    return numbers[node_name(tensor)], tensor.partition(":")[2] or "0"


def share_equal_inputs(graph, sites):
    """Sites whose activations hold the same values get one tensor.

    Each Dense layer reshapes its input with nodes of its own (Tensordot), so q, k, v and fc_in,
    which all read the same layer norm, have four activation tensors. Once they read one, they
    share one calibration range and one QuantizeV2, and `fuse_int8_matmuls` gives them one kernel."""
    index = GraphIndex(graph.graph_def)
    numbers = _value_numbers(index, [s.activation for s in sites])
    first, shared = {}, []
    rw = Rewriter(graph)
    for site in sites:
        tensor = first.setdefault(_tensor_number(numbers, site.activation), site.activation)
        if tensor != site.activation:
            rw.replace_input(site.matmul, 0, tensor)
            site = dataclasses.replace(site, activation=tensor)
        shared.append(site)
    return rw.finish(), shared


# Ops that only move or view a tensor: a value read through them is still the value.
_MOVES = {"Identity", "Unpack", "StridedSlice", "Reshape", "Squeeze", "Transpose", "GatherV2"}


def _reads_cache(index, tensor, cache):
    node = index.producer(tensor)
    while node.op in _MOVES:
        node = index.producer(node.input[0])
    return node.name == cache


def find_pair_inputs(graph, ops):
    """(node, input index, tensor) of every float data input of the nodes of type `ops`.

    A ConcatV2 that appends to the KV cache (decode's past keys and values) is no site: its pair
    would re-quantize the whole cache at every step."""
    index = GraphIndex(graph.graph_def)
    cache = graph.inputs.get(generation.CACHE)
    found = []
    for node in graph.graph_def.node:
        if node.op not in ops or node.attr["T"].type != tf.float32.as_datatype_enum:
            continue
        n_data = node.attr["N"].i if node.op == "ConcatV2" else len(node.input)
        data = [t for t in node.input[:n_data] if not t.startswith("^")]
        if node.op == "ConcatV2" and cache and any(_reads_cache(index, t, cache) for t in data):
            continue
        for i, tensor in enumerate(node.input[:n_data]):
            if not tensor.startswith("^") and index.producer(tensor).op != "Const":
                found.append((node.name, i, tensor))
    return found


def int8_only_weights(graph, sites, embeddings):
    """(ids of the variables whose every read in `graph` is the weight of one of `sites` or the table
    of one of `embeddings`, ids of the variables read otherwise). Once the int8 copies of the first
    exist, this graph needs no FP32 value of them."""
    index = GraphIndex(graph.graph_def)
    allowed = {(s.matmul, 1) for s in sites} | {(gather, 0) for gather, _ in embeddings}

    def read_only_as_allowed(name):
        for consumer in index.consumers[name]:
            for i, tensor in enumerate(consumer.input):
                if tensor.startswith("^") or node_name(tensor) != name:
                    continue
                if consumer.op in ("Identity", "ReadVariableOp"):
                    if not read_only_as_allowed(consumer.name):
                        return False
                elif (consumer.name, i) not in allowed:
                    return False
        return True

    only, other = set(), set()
    for holder, value in graph.feeds.items():
        if isinstance(value, tf.Variable):
            (only if read_only_as_allowed(holder) else other).add(id(value))
    return only, other


def find_embeddings(graph):
    """(ResourceGather node, placeholder) for embedding lookups of a float weight variable."""
    index = GraphIndex(graph.graph_def)
    found = []
    for node in graph.graph_def.node:
        if node.op == "ResourceGather" and node.attr["dtype"].type == tf.float32.as_datatype_enum:
            holder = index.through_identity(node.input[0]).name
            if isinstance(graph.feeds.get(holder), tf.Variable):
                found.append((node.name, holder))
    return found
