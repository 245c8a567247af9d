"""Command-line plumbing shared by the scripts: ``--config``/``KEY=VALUE`` parsing and clean errors.

A user's mistake (an unknown key, a bad data row, a missing file) ends the program with one
line on stderr naming the problem, and exit status 2 — no traceback. Bugs still show theirs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .adapter_state import AdapterStateError
from .config import ConfigError, help_text, load_config
from .formats import DataError

USER_ERRORS = (ConfigError, DataError, AdapterStateError)
EXIT_USER_ERROR = 2


def config_parser(description: str, epilog_keys: bool = True) -> argparse.ArgumentParser:
    """A parser taking ``--config PATH`` and free ``KEY=VALUE`` overrides; ``--help`` lists every key."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=("settings (KEY=VALUE, dotted):" + help_text()) if epilog_keys else None)
    parser.add_argument("--config", help="training recipe (YAML); default: the embedded demo")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="override a setting, e.g. training.max_steps=20 lora.r=8 output_dir=/tmp/run")
    return parser


def config_from_args(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def run_main(main, argv=None) -> None:
    """Call ``main(argv)``; turn user errors into one line and exit status 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
