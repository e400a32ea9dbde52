"""Turn a binary GraphDef (.pb) into text (.pbtxt) to read it.

    python pb_to_pbtxt.py --input ./output/converted_graph_def.pb --output ./output/converted_graph_def.pbtxt
"""
import argparse
import os
from pathlib import Path

from google.protobuf import text_format

from gptj_int8 import cli, savedmodel


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default="./output/converted_graph_def.pb")
    p.add_argument("--output", default=None, help="default: the input with .pbtxt")
    args = p.parse_args()
    graph_def = savedmodel.read_graph_def(args.input)
    out = Path(args.output or Path(args.input).with_suffix(".pbtxt"))
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text_format.MessageToString(graph_def))
    os.replace(tmp, out)
    print(f"wrote {out} ({len(graph_def.node)} nodes)")


if __name__ == "__main__":
    cli.run(main)
