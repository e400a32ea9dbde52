"""Small GraphDef primitives: build nodes, look up producers and consumers."""
import collections

import tensorflow as tf
from tensorflow.core.framework import attr_value_pb2, node_def_pb2


def node_name(tensor):
    """'^a', 'a:1', 'a' -> 'a'."""
    return tensor.lstrip("^").split(":")[0]


def make_node(op, name, inputs, **attrs):
    node = node_def_pb2.NodeDef(op=op, name=name, input=list(inputs))
    for key, value in attrs.items():
        node.attr[key].CopyFrom(_attr(value))
    return node


def _attr(value):
    if isinstance(value, attr_value_pb2.AttrValue):
        return value
    if isinstance(value, tf.dtypes.DType):
        return attr_value_pb2.AttrValue(type=value.as_datatype_enum)
    if isinstance(value, bool):
        return attr_value_pb2.AttrValue(b=value)
    if isinstance(value, int):
        return attr_value_pb2.AttrValue(i=value)
    if isinstance(value, float):
        return attr_value_pb2.AttrValue(f=value)
    if isinstance(value, str):
        return attr_value_pb2.AttrValue(s=value.encode())
    if isinstance(value, list) and all(isinstance(v, tf.dtypes.DType) for v in value):
        return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(
            type=[v.as_datatype_enum for v in value]))
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(i=value))
    if isinstance(value, list):
        return attr_value_pb2.AttrValue(list=attr_value_pb2.AttrValue.ListValue(
            s=[v.encode() for v in value]))
    raise TypeError(f"unsupported attr value {value!r}")


def make_const(name, value, dtype):
    return make_node("Const", name, [], dtype=dtype,
                     value=attr_value_pb2.AttrValue(tensor=tf.make_tensor_proto(value, dtype)))


def make_resource_placeholder(name):
    return make_node("Placeholder", name, [], dtype=tf.resource)


class GraphIndex:
    """Name -> node and name -> consumers of a GraphDef, for pattern matching."""

    def __init__(self, graph_def):
        self.nodes = {n.name: n for n in graph_def.node}
        self.consumers = collections.defaultdict(list)
        for n in graph_def.node:
            for i in n.input:
                self.consumers[node_name(i)].append(n)

    def producer(self, tensor):
        return self.nodes[node_name(tensor)]

    def through_identity(self, tensor):
        """The node behind a chain of Identity ops."""
        node = self.producer(tensor)
        while node.op == "Identity":
            node = self.producer(node.input[0])
        return node


class Rewriter:
    """Edits a ServingGraph's GraphDef and feeds in place; nodes are replaced by name."""

    def __init__(self, graph):
        self.graph = graph
        self.nodes = {n.name: n for n in graph.graph_def.node}

    def add(self, *nodes):
        for node in nodes:
            self.nodes[node.name] = node

    def replace_input(self, consumer, index, tensor):
        self.nodes[consumer].input[index] = tensor

    def read_variable(self, name, variable):
        """Bind `variable` to a new placeholder `name`; returns the tensor that reads it."""
        self.graph.feeds[name] = variable
        self.add(make_resource_placeholder(name),
                 make_node("ReadVariableOp", f"{name}/read", [name], dtype=variable.dtype))
        return f"{name}/read"

    def finish(self):
        del self.graph.graph_def.node[:]
        self.graph.graph_def.node.extend(self.nodes.values())
        return self.graph
