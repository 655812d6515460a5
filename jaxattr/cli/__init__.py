"""The `jaxattr` command line: one module per command (`explain`, `evaluate`, `bench`, `models`,
`convert`, `crosscheck`), each with `add_parser` and `run(args) -> exit status`.

`main(argv) -> exit status`; `entry()` is the program (`main()`, then exit). PyTorch is imported
only by `convert --verify/--random-init` and by `crosscheck` (through the `converters` package), so
`jaxattr explain` runs on the core install.
Every failure a user can cause is one line on stderr (`jaxattr: error: ...`, exit 1) or a usage
error (exit 2); an interrupted run (Ctrl-C: 130, SIGTERM: 143) saves the records of what it
finished, ignores further interrupts while it does, and resumes when run again. An interrupt stops
a run at once, even during a batch's minutes-long XLA call (`jaxattr.run.call_interruptibly`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import sys
import threading
from typing import Iterator, NoReturn, Sequence

from jaxattr.cli import bench, convert, crosscheck, evaluate, explain, models
from jaxattr.cli._common import CliError
from jaxattr.methods import list_methods
from jaxattr.models import WeightsError
from jaxattr.run import RunError, computing_abandoned


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit status 2) that point to --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(method: str | None = explain.DEFAULT_METHOD) -> argparse.ArgumentParser:
    """The argument parser; `explain` gets the config options of `method` (none if None)."""
    parser = _Parser(prog="jaxattr", description="Saliency maps for image classifiers, in JAX.", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    models.add_parser(commands)
    explain.add_parser(commands, method)
    evaluate.add_parser(commands)
    bench.add_parser(commands, method)
    convert.add_parser(commands)
    crosscheck.add_parser(commands)
    return parser


def _requested_method(argv: Sequence[str]) -> str:
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--method", default=explain.DEFAULT_METHOD)
    return pre.parse_known_args(argv)[0].method


def _unknown_arguments_message(args: argparse.Namespace, unknown: list[str]) -> str:
    """Name the method an option belongs to when it is another method's config option."""
    if args.command in ("explain", "bench"):
        owners = collections.defaultdict(list)
        for method in list_methods():
            for flag in explain.method_flags(method):
                owners[flag].append(method)
        for arg in unknown:
            flag = arg.split("=", 1)[0]
            if flag in owners:
                return (
                    f"{args.method} has no option {flag} (an option of {', '.join(owners[flag])}); "
                    f"options of {args.method}: {', '.join(explain.method_flags(args.method)) or 'none'}"
                )
    return f"unrecognized arguments: {' '.join(unknown)}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    method = _requested_method(argv)
    parser = build_parser(method if method in list_methods() else None)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.parser.error(_unknown_arguments_message(args, unknown))  # the subcommand's usage
    return args


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C, so finished work is saved on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame) -> None:
    # Further signals are ignored from now on: the run is already stopping, and a second Ctrl-C
    # must not break the summary write or the message on the way out.
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted while a command runs (main thread only). After one
    has arrived they stay ignored: the process is on its way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Interrupted:
        raise
    except BaseException:
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise
    else:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _report(message: str) -> None:
    try:
        print(message, file=sys.stderr)
    except (OSError, ValueError):  # stderr closed: nothing left to tell
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with _signals_interrupt():
            try:
                args = parse_args(argv)
                return args.run(args)
            except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
                return e.code if isinstance(e.code, int) else 2
            except (CliError, WeightsError, RunError) as e:
                _report(f"jaxattr: error: {e}")
                return getattr(e, "status", 1)
            except MemoryError:
                _report("jaxattr: error: out of memory; lower --batch-size or the method's sizes, or set --chunk")
                return 1
            except BrokenPipeError:  # stdout closed early (`jaxattr ... | head`): stop quietly
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 1
    except KeyboardInterrupt as e:
        status = 128 + getattr(e, "signum", signal.SIGINT)
        _report("\njaxattr: interrupted; finished outputs are kept, run the same command to resume")
        return status


def entry() -> NoReturn:
    """The `jaxattr` program: `main()` on the command line, then exit with its status. After an
    interrupt during a batch, the batch's XLA call still runs on a daemon thread, and a normal
    interpreter exit under it aborts the process (status 134, "terminate called ..."): the
    process then ends at once with os._exit, its output flushed (the summary is already written)."""
    status = main()
    if computing_abandoned():
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # closed or broken: nothing more to say
                stream.flush()
        os._exit(status)
    sys.exit(status)
