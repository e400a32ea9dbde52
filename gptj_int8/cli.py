"""What every script shares: one clear error line for bad input, logging, argument types."""
import argparse
import logging
import os
import signal
import sys


def _cpuinfo(field):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags():
    """The CPU's feature flags (avx2, avx512_vnni, amx_int8, ...) from /proc/cpuinfo."""
    return set(_cpuinfo("flags").split())


def cpu_name():
    """The CPU's model name and its widest int8 instructions, e.g. 'AMD EPYC (AVX2, no VNNI)'."""
    flags = cpu_flags()
    isa = ("AMX" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags
           else "AVX-VNNI" if "avx_vnni" in flags else "AVX-512, no VNNI" if "avx512f" in flags
           else "AVX2, no VNNI" if "avx2" in flags else "no AVX2")
    return f"{_cpuinfo('model name') or 'unknown CPU'} ({isa}, {os.cpu_count()} cores)"


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, never as a traceback."""


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def non_negative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


_interrupted = False


def _interrupt(signum, frame):
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def run(main):
    """Run a script's main(): UserError becomes 'error: ...' on stderr and exit code 2; Ctrl-C and
    `kill` become 'error: interrupted' and exit code 130."""
    # force: a library's logging.warning() at import (Beam's does) sets up the root logger first
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", force=True)
    # TensorFlow's saving chatter (once per variable, and absl's "renamed to unknown" per
    # signature) and datasets' version line are not the project's
    for name in ("tensorflow", "absl", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING if name == "datasets" else logging.ERROR)
    # transformers' notes on loading (its TF classes' deprecation, "all layers were used") too
    import transformers
    transformers.logging.set_verbosity_error()
    # `kill` (SIGTERM) unwinds like Ctrl-C, so temporary outputs are removed on the way out. Ctrl-C
    # is caught only where Python would (a process started with SIGINT ignored keeps ignoring it).
    signal.signal(signal.SIGTERM, _interrupt)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        # an interrupt that lands inside TensorFlow's C++ surfaces as another exception
        # (e.g. SystemError from a tensor conversion): it is still the user's interrupt
        if _interrupted:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        raise
