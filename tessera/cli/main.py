"""`tessera <command>`: the one command-line entry point.

Errors a user can fix (bad config, missing data, bad input) print one line and exit 2; a run
that diverges exits 1; a run stopped at request exits 3. `--debug` anywhere on the line shows
the traceback instead.
"""
from __future__ import annotations

import argparse
import signal
import sys

from tessera import __version__
from tessera.cli import cluster, data, evaluate, interop, prompting, recipe, train
from tessera.cli.errors import EXIT_INTERRUPTED, TrainingInterrupted, exit_status

COMMAND_GROUPS = (data, train, recipe, evaluate, prompting, cluster, interop)  # the order `tessera --help` lists them


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera", description="Train your own language models.",
                                formatter_class=lambda prog: argparse.HelpFormatter(prog, width=100))
    p.add_argument("--version", action="version", version=f"tessera {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="<subcommand>")  # wide enough for one line each
    for group in COMMAND_GROUPS:
        group.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # as a command: let `tessera ... | head` end quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args, extra = parser().parse_known_args(argv)
    overrides = [a for a in extra if a.startswith("--") and "=" in a]
    stray = [a for a in extra if a not in overrides]
    if stray or (overrides and not getattr(args, "takes_overrides", False)):
        print(f"tessera: error: unrecognized arguments: {' '.join(stray or overrides)}", file=sys.stderr)
        return 2
    try:
        if getattr(args, "takes_overrides", False):
            args.func(args, overrides)
        else:
            args.func(args)
    except Exception as e:
        if isinstance(e, TrainingInterrupted):
            if str(e):  # the first rank's word; the others exit quietly
                print(f"tessera: training interrupted: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        status = exit_status(e)
        if debug or status is None:
            raise
        print(f"tessera: {'training stopped' if status == 1 else 'error'}: {e}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
