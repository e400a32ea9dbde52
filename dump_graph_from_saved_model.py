"""Write the serving graph of a SavedModel to ./dumped_graph.pb and count its ops by type.

    python dump_graph_from_saved_model.py --input_model=./converted_gptj-kjv
"""
import argparse
import collections

from gptj_int8 import cli, savedmodel
from gptj_int8.int8_matmul import KERNEL_OPS

SHOWN_FIRST = ("QuantizeV2", "Dequantize", *KERNEL_OPS.values(), "MatMul", "BatchMatMulV2", "ConcatV2")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input_model", required=True, help="a SavedModel folder")
    p.add_argument("--output", default="./dumped_graph.pb")
    args = p.parse_args()
    loaded, fn = savedmodel.load_serving_function(args.input_model)
    graph = savedmodel.extract_serving_graph(loaded, fn)
    savedmodel.write_graph_def(graph.graph_def, args.output)
    counts = collections.Counter(n.op for n in graph.graph_def.node)
    print(f"wrote {args.output}: {len(graph.graph_def.node)} nodes")
    for op in SHOWN_FIRST:
        print(f"  {op:<22} {counts.pop(op, 0)}")
    for op, n in counts.most_common():
        print(f"  {op:<22} {n}")


if __name__ == "__main__":
    cli.run(main)
