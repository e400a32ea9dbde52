"""The docs cannot drift from the code: every `python X.py --flag ...` command in README.md and
docs/*.md names a script that exists, and only flags that script's argparse accepts.

Commands are taken from code blocks (indented or fenced, a trailing backslash continuing a line)
and from inline code spans in prose. The flags a script accepts are read from its source, from
every `add_argument` call (with `--no-<flag>` for a BooleanOptionalAction), without importing it
(the scripts import TensorFlow). A script that hands the flags it does not know to Apache Beam
(`parse_known_args`) also accepts Beam's pipeline options. A flag must be named in full: argparse
would also take an unambiguous prefix, which breaks as soon as a script gains a flag sharing it.
"""
import argparse
import ast
import re
import shlex
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

COMMAND = re.compile(r"(?<![\w/.-])python3?\s+(?P<script>[\w./-]+\.py)(?![\w.])")
FLAG = re.compile(r"^--?[A-Za-z][\w-]*")
ENDS_COMMAND = {"&&", "||", ";", "|", "&", ")", "("}   # <placeholders> and redirections name no flag


@lru_cache(maxsize=None)
def beam_flags():
    """The option strings of every Apache Beam PipelineOptions class (--runner, --project, ...)."""
    from apache_beam.options.pipeline_options import PipelineOptions
    parser = argparse.ArgumentParser(add_help=False, conflict_handler="resolve")
    parser.add_value_provider_argument = parser.add_argument      # what Beam's own parser adds
    classes, seen = list(PipelineOptions.__subclasses__()), set()
    while classes:
        cls = classes.pop()
        if cls not in seen:
            seen.add(cls)
            cls._add_argparse_args(parser)
            classes.extend(cls.__subclasses__())
    return frozenset(s for action in parser._actions for s in action.option_strings)


@lru_cache(maxsize=None)
def accepted_flags(script):
    """The option strings of `script`'s argparse: those of its add_argument calls, read from the source."""
    flags = {"-h", "--help"}
    source = script.read_text()
    if "parse_known_args" in source:
        flags.update(beam_flags())
    for node in ast.walk(ast.parse(source, str(script))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "add_argument"):
            continue
        names = [a.value for a in node.args
                 if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("-")]
        flags.update(names)
        if any(k.arg == "action" and "BooleanOptionalAction" in ast.unparse(k.value) for k in node.keywords):
            flags.update("--no-" + n[2:] for n in names if n.startswith("--"))
    return frozenset(flags)


def code_texts(markdown):
    """(line number, text) of each line of a code block (a backslash joining it to the next) and of
    each inline code span (joined across line breaks)."""
    texts, paragraph, fence = [], [], None

    def end_paragraph():
        if paragraph and all(line.startswith("    ") for _, line in paragraph):   # an indented code block
            texts.extend(logical_lines(paragraph))
        elif paragraph:
            joined = " ".join(line for _, line in paragraph)
            starts = [n for n, line in paragraph for _ in range(len(line) + 1)]    # a line number per character
            for span in re.finditer(r"`([^`]+)`", joined):
                texts.append((starts[span.start()], span.group(1)))
        paragraph.clear()

    for n, line in enumerate(markdown.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fence is None:
                end_paragraph()
                fence = []
            else:
                texts.extend(logical_lines(fence))
                fence = None
        elif fence is not None:
            fence.append((n, line))
        elif not line.strip():
            end_paragraph()
        else:
            paragraph.append((n, line))
    end_paragraph()
    return texts


def logical_lines(lines):
    """(line number, text) of each line of a code block, a line ending in a backslash joined to the next."""
    out, pending = [], None
    for n, line in lines:
        start, text = pending if pending else (n, "")
        text += " " + line.strip()
        if text.endswith("\\"):
            pending = start, text[:-1]
        else:
            out.append((start, text.strip()))
            pending = None
    if pending:
        out.append((pending[0], pending[1].strip()))
    return out


def commands(markdown):
    """(line number, script path as written, [flags]) of every `python X.py ...` in `markdown`."""
    found = []
    for n, text in code_texts(markdown):
        heads = list(COMMAND.finditer(text))
        for match, after in zip(heads, [h.start() for h in heads[1:]] + [len(text)]):
            lexer = shlex.shlex(text[match.end():after], posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            flags = []
            try:
                for token in lexer:
                    if token in ENDS_COMMAND:
                        break
                    if flag := FLAG.match(token):
                        flags.append(flag.group(0))
            except ValueError as e:   # an unclosed quote
                raise AssertionError(f"line {n}: cannot read the command {text!r}: {e}") from None
            found.append((n, match.group("script"), flags))
    return found


def unknown_flags(script, flags):
    accepted = accepted_flags(script)
    return [f for f in flags if f not in accepted]


def doc_commands():
    return [pytest.param(doc, n, script, flags, id=f"{doc.relative_to(ROOT)}:{n}:{Path(script).name}")
            for doc in DOCS for n, script, flags in commands(doc.read_text())]


@pytest.mark.parametrize("doc, line, script, flags", doc_commands())
def test_command_names_a_script_and_its_flags(doc, line, script, flags):
    where = f"{doc.relative_to(ROOT)}:{line}"
    path = ROOT / script
    assert path.is_file(), f"{where}: {script} does not exist"
    unknown = unknown_flags(path, flags)
    assert not unknown, f"{where}: {script} has no {', '.join(unknown)} (it takes {sorted(accepted_flags(path))})"


def test_the_docs_hold_the_commands():
    """A guard on the reading itself: the README's main commands are found, flags included."""
    found = {(script, tuple(flags)) for _, script, flags in commands((ROOT / "README.md").read_text())}
    assert ("quantize.py", ("--output_dir",)) in found
    assert ("run_benchmark.py", ("--output_dir",)) in found
    assert any(script == "generate.py" and "--prompt" in flags for script, flags in found)
    assert len(DOCS) >= 5, "README.md and the four pages under docs/"


def test_a_flag_the_script_lacks_is_caught():
    doc = "Run\n\n    python quantize.py --output_dir=./o \\\n        --no_such_flag 1 && python generate.py --prompt x\n\n" \
          "and `python\nbench/speed.py --iterations 5 --made_up`.\n"
    (n1, s1, f1), (n2, s2, f2), (n3, s3, f3) = commands(doc)
    assert (n1, s1, f1) == (3, "quantize.py", ["--output_dir", "--no_such_flag"])
    assert unknown_flags(ROOT / s1, f1) == ["--no_such_flag"]
    assert (s2, f2) == ("generate.py", ["--prompt"]) and not unknown_flags(ROOT / s2, f2)
    assert (n3, s3, f3) == (6, "bench/speed.py", ["--iterations", "--made_up"])
    assert unknown_flags(ROOT / s3, f3) == ["--made_up"]
    assert "--no-itex_mode" in accepted_flags(ROOT / "quantize.py")
    assert {"--runner", "--worker_machine_type", "--direct_num_workers"} <= accepted_flags(ROOT / "run_benchmark.py")
    assert "--runner" not in accepted_flags(ROOT / "quantize.py")
