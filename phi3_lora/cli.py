"""Command-line plumbing shared by the scripts: ``--config``/``KEY=VALUE`` parsing and clean errors.

A user's mistake (an unknown key, a bad data row, a missing file) ends the program with one
line on stderr naming the problem, and exit status 2 — no traceback. Bugs still show theirs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from .checkpoint import EXIT_PREEMPTED, CheckpointError, Preempted
from .config import ConfigError, help_text, load_config
from .formats import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError)
EXIT_USER_ERROR = 2


class ConfigArgumentParser(argparse.ArgumentParser):
    """Overrides on both sides of the options, ``a=1 --config X b=2`` (scripts/slurm/job.sh puts its own first)."""

    def parse_args(self, args=None, namespace=None):
        return self.parse_intermixed_args(args, namespace)


def config_parser(description: str, epilog_keys: bool = True) -> argparse.ArgumentParser:
    """A parser taking ``--config PATH`` and free ``KEY=VALUE`` overrides; ``--help`` lists every key."""
    parser = ConfigArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("settings (KEY=VALUE, dotted):" + help_text()) if epilog_keys else None)
    parser.add_argument("--config", help="training recipe (YAML); default: the embedded demo")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override a setting, e.g. training.max_steps=20 lora.r=8 output_dir=/tmp/run")
    return parser


def positive(kind=int):
    """An argparse ``type``: a number of ``kind`` above 0 (``--num_examples -3`` is a usage error, not silence)."""
    def parse(text: str):
        value = kind(text)  # a ValueError: argparse says "invalid int value"
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def config_from_args(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def quiet_library_noise() -> None:
    """Silence, by their exact text, library messages a user can do nothing about; all others still show.

    * bitsandbytes >= 0.50 with the ``kernels`` package (a dependency of transformers >= 5.25), on CPUs
      with AVX512-BF16, offers an optional CPU kernel from the hub, refuses it because its publisher is not
      trusted (remote code stays off, as this toolkit wants), logs a warning and runs its own kernels —
      printed at import, also by runs with no 4-bit layer. Other failures to load that kernel still show.
    * peft asks transformers for ``is_gradient_checkpointing``, deprecated since transformers 5.24.
    """
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "could not verify publisher trust" not in record.getMessage())


def run_main(main, argv=None) -> None:
    """Call ``main(argv)``; turn user errors into one line and exit status 2, preemption into status 75."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    quiet_library_noise()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Preempted as err:
        print(f"preempted: {err}", file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
