"""The ``stepcache`` command line.

Each subcommand lives in its own module under ``stepcache.tools`` and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. The modules are imported only when their
subcommand runs, so ``stepcache --help`` stays fast and a missing optional dependency of one tool
never breaks another.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("stepcache.tools.demo", "run the bundled DreamZero-style model with and without StepCache"),
    "train": ("stepcache.tools.train", "train a bundled model from scratch (reproducible, fixed seed)"),
    "generate": ("stepcache.tools.generate", "sample a bundled diffusers model with and without StepCache"),
    "bench": ("stepcache.tools.bench", "quality against compute: StepCache vs fewer steps, peers and an oracle"),
    "calibrate": ("stepcache.tools.calibrate", "search StepCache settings for a forward budget or PSNR floor"),
}


def _available_subcommands() -> dict[str, tuple[str, str]]:
    """The subcommands whose module is part of this installation (some land in later releases)."""
    return {name: entry for name, entry in SUBCOMMANDS.items() if module_exists(entry[0])}


def module_exists(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (its parents may be missing too)."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stepcache", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in _available_subcommands().items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(_module=module_name)
        # Arguments are added lazily (below) so that --help of one tool imports only that tool.
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = _build_parser()
    # Parse the subcommand first (without --help, which would exit before the tool's own arguments
    # exist), then let its module declare its arguments and parse for real.
    if not any(arg in _available_subcommands() for arg in argv):
        parser.parse_args(argv)  # prints top-level help or the usage error, and exits
    known, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])
    module = importlib.import_module(known._module)
    subparsers_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    module.add_arguments(subparsers_action.choices[known.command])
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
