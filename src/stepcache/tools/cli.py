"""The ``stepcache`` command line.

Each subcommand lives in its own module under ``stepcache.tools`` and exposes ``add_arguments(parser)``,
``run(args) -> int`` and, where a check needs more than one option's text (the core, a file, the
model), ``validate(args)``, which raises :class:`~stepcache.tools.common.UsageError` before any work.
The modules are imported only when their subcommand runs, so ``stepcache --help`` stays fast and a
missing optional dependency of one tool never breaks another.

Exit status: 0 done, 1 the run finished without the requested result (e.g. calibrate found no config),
2 a usage error (one line on stderr, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import shlex
import sys
from collections.abc import Iterator

import stepcache
from stepcache.tools.common import EXIT_USAGE, ArgumentParser, HelpFormatter, UsageError, error_line

EXIT_INTERRUPTED = 130  # the shell's convention for SIGINT

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("stepcache.tools.demo", "run the bundled DreamZero-style model with and without StepCache"),
    "train": ("stepcache.tools.train", "train a bundled model from scratch (reproducible, fixed seed)"),
    "generate": ("stepcache.tools.generate", "sample a bundled diffusers model with and without StepCache"),
    "bench": ("stepcache.tools.bench", "quality against compute: StepCache vs fewer steps, peers and an oracle"),
    "calibrate": ("stepcache.tools.calibrate", "calibrate StepCache from one recorded generation per input"),
    "serve": ("stepcache.tools.serve", "serve the DreamZero-style model to many robots over HTTP, batched per step"),
}

VERBOSE_HELP = "debug messages from stepcache's loggers (other libraries stay at warnings)"


def _available_subcommands() -> dict[str, tuple[str, str]]:
    """The subcommands whose module is part of this installation (some land in later releases)."""
    return {name: entry for name, entry in SUBCOMMANDS.items() if module_exists(entry[0])}


def module_exists(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (its parents may be missing too)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="stepcache",
        description="StepCache: skip whole DiT forwards while successive flow-matching velocities stay aligned.",
        epilog="Run 'stepcache COMMAND --help' for a command's options. Exit status: 0 done, 1 no result "
        "(e.g. calibrate found no config), 2 usage error, 130 interrupted.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {stepcache.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in _available_subcommands().items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        # SUPPRESS: an absent -v after the subcommand must not undo one given before it.
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
        sub.set_defaults(_module=module_name)
        # The tool's own arguments are added lazily (in main) so that --help of one tool imports only that tool.
    return parser


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[command]


@contextlib.contextmanager
def _terminal_logging(verbose: bool) -> Iterator[None]:
    """stepcache's loggers at INFO (DEBUG with -v), everyone else's at WARNING; Python warnings are
    logged too, so that they print above a progress bar instead of inside its line."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    package_logger = logging.getLogger("stepcache")
    previous_level = package_logger.level
    package_logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.captureWarnings(True)
    try:
        try:
            from tqdm.contrib.logging import logging_redirect_tqdm
        except ImportError:  # tqdm comes with the tools extra; without it there is no bar to protect
            yield
        else:
            with logging_redirect_tqdm():
                yield
    finally:
        logging.captureWarnings(False)
        package_logger.setLevel(previous_level)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    # Parse the subcommand first (without --help, which would exit before the tool's own arguments
    # exist), then let its module declare its arguments and parse for real.
    if not any(arg in _available_subcommands() for arg in argv):
        parser.parse_args(argv)  # prints the top-level help, the version or the usage error, and exits
    known, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    module = importlib.import_module(known._module)
    module.add_arguments(_subparser(parser, known.command))
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["stepcache", *argv])
    with _terminal_logging(args.verbose):
        try:
            validate = getattr(module, "validate", None)
            if validate is not None:
                validate(args)
            return int(module.run(args) or 0)
        except UsageError as err:
            print(f"stepcache {args.command}: error: {error_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print(f"stepcache {args.command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
