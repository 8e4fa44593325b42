"""The `l2b` command line. Every user-facing failure is one line `l2b: error: ...` and exit code 2.

``parser`` builds the flags, ``commands`` runs each subcommand; :func:`main` ties them together."""

from __future__ import annotations

import logging
import sys

from ..errors import Interrupted, L2BError
from ..parallel import is_rank_zero, rank_prefix
from .commands import (bench_command, data_command, labels_command, predict_command, report_command,
                       sweep_command, train_command)
from .parser import build_parser, version_line

__all__ = ["build_parser", "main", "version_line"]

COMMANDS = {  # subcommand -> what runs it (train also gets argv: a data-parallel run relaunches itself)
    "train": lambda args, argv: train_command(args, argv),
    "sweep": lambda args, argv: sweep_command(args),
    "report": lambda args, argv: report_command(args),
    "bench": lambda args, argv: bench_command(args),
    "data": lambda args, argv: data_command(args),
    "labels": lambda args, argv: labels_command(args),
    "predict": lambda args, argv: predict_command(args, evaluate=False),
    "eval": lambda args, argv: predict_command(args, evaluate=True),
}


def load_plugins(argv: list[str]) -> list[str]:
    """Import the modules named by ``--plugin`` before the subcommand, and those of the ``l2b.plugins``
    entry-point group of installed packages, so their registrations count in flags, help and validation."""
    from importlib import import_module
    from importlib.metadata import entry_points

    names, i = [], 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--plugin" and i + 1 < len(argv):
            names.append(argv[i + 1])
            i += 1
        elif argv[i].startswith("--plugin="):
            names.append(argv[i].split("=", 1)[1])
        i += 1
    for name in names:
        try:
            import_module(name)
        except ImportError as exc:
            raise L2BError(f"--plugin {name}: cannot import it ({exc}); is its folder on PYTHONPATH?") from None
    for ep in entry_points(group="l2b.plugins"):
        try:
            ep.load()
        except ImportError as exc:
            raise L2BError(f"plugin {ep.name!r} of an installed package cannot be imported ({exc})") from None
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        load_plugins(argv)
        args = build_parser().parse_args(argv)
        if args.command in COMMANDS:
            return COMMANDS[args.command](args, argv)
        build_parser().print_help()
        return 2
    except L2BError as exc:
        if debug:
            raise
        print(f"l2b: error: {rank_prefix()}{exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        if is_rank_zero():  # every rank stopped at the same step; one says where to resume
            print(f"l2b: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("l2b: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: the reader left, nothing to say
        _silence_stdout()
        return 0
    except OSError as exc:  # a full disk, a missing permission...: one line naming the file
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"l2b: error: {rank_prefix()}{where}{exc.strerror or exc}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush does not fail on the closed pipe."""
    import os

    if sys.stdout is not sys.__stdout__:  # in-process (tests): the caller owns that stream
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
