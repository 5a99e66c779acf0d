"""What every ``stepcache`` subcommand shares: argument types and checks, output folders, run
metadata for JSON outputs, progress bars and number formatting.

A bad value found while parsing is argparse's usage error; one found by a tool's ``validate(args)``
(which needs the core, a file or another option) is a :class:`UsageError`. ``stepcache`` prints
either as one line and exits with status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import stepcache
from stepcache.config import shown

EXIT_USAGE = 2  # argparse's status for a usage error


# The longest error line the CLI prints: argparse echoes whole argument values (a 5 MB --cache-config
# would be a 5 MB line); our own messages already cut the values they echo (stepcache.config.shown).
MAX_ERROR_CHARS = 2000


class UsageError(Exception):
    """A bad command-line value: printed as one line (no traceback), exit status 2."""


def error_line(message: object) -> str:
    """``message`` cut to at most :data:`MAX_ERROR_CHARS` characters."""
    text = str(message)
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return f"{text[:MAX_ERROR_CHARS]}... ({len(text) - MAX_ERROR_CHARS} more characters cut)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error on one line: ``stepcache demo: error: argument --x: ... (see --help)``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {error_line(message)} (see '{self.prog} --help')\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where a default means something (not for None or a False flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class DeprecatedAlias(argparse.Action):
    """An old option spelling that still works and says which one replaces it."""

    def __init__(self, option_strings: list[str], dest: str, *, replacement: str, **kwargs: Any) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated, use {self.replacement}", file=sys.stderr)
        setattr(namespace, self.dest, values)


# -- argument types (argparse calls them; ArgumentTypeError becomes "argument --x: <message>") ------


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not an integer; allowed: an integer >= {minimum}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not allowed; allowed: an integer >= {minimum}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int_at_least(text, 1)


def seed_int(text: str) -> int:
    """A random seed: an integer >= 0 (what ``torch.Generator.manual_seed`` and numpy both accept)."""
    return _int_at_least(text, 0)


def finite_float(text: str) -> float:
    """A finite number (no nan / inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{shown(text)} is not allowed; allowed: a finite number")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not allowed; allowed: a number > 0")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not allowed; allowed: a number >= 0")
    return value


# -- options shared by the subcommands -------------------------------------------------------------


def add_json_argument(parser: argparse.ArgumentParser, help_text: str = "also write the results to this file") -> None:
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help=help_text)


def add_threads_argument(parser: argparse.ArgumentParser, default: int | None = None, note: str = "") -> None:
    """``--threads N``; ``note`` says why the default is what it is (None: torch's own default)."""
    note = note or ("" if default else "default: torch's")
    help_text = "torch intra-op threads" + (f" ({note})" if note else "")
    parser.add_argument("--threads", type=positive_int, default=default, metavar="N", help=help_text)


def add_progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress: neither the bar on a terminal nor the lines written when stderr is a pipe or a log",
    )


def add_cache_config_argument(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    """``--cache-config``; ``default`` a preset name (None: the seed's defaults)."""
    from stepcache.config import PRESETS

    # A preset default shows through HelpFormatter's "(default: X)"; None needs saying in words.
    default_text = "" if default else "; default: StepCache's defaults (DreamZero's)"
    parser.add_argument(
        "--cache-config",
        default=default,
        metavar="JSON|PATH",
        help='StepCache settings (DiffusionCacheConfig fields) as a JSON object, e.g. \'{"velocity_sim_thresholds": '
        '[0.97], "velocity_skip_countdowns": [2]}\', the path of a JSON file (what calibrate writes) or a preset '
        f"name ({', '.join(PRESETS)}){default_text}",
    )


# -- checks a tool's validate(args) runs before any work --------------------------------------------


def checked_cache_config(value: Any, option: str = "--cache-config") -> Any:
    """The :class:`~stepcache.DiffusionCacheConfig` that ``value`` (JSON text, a file path, None) means."""
    from stepcache.config import as_diffusion_cache_config, as_step_cache_config

    try:
        config = as_diffusion_cache_config(value)
        as_step_cache_config(config)  # its values too: a tool fails before any work
        return config
    except (ValueError, OSError) as err:  # json.JSONDecodeError is a ValueError
        raise UsageError(f"argument {option}: {err}") from None


def format_cache_config(config: Any) -> str:
    """The fields in force, user-facing names (:func:`~stepcache.config.describe_config`); JSON outputs
    hold the whole config."""
    from stepcache.config import describe_config

    return describe_config(config)


def package_dir() -> Path:
    """The installed ``stepcache`` package folder: nothing the tools write goes in there."""
    return Path(stepcache.__file__).resolve().parent


def is_inside(path: Path, folder: Path) -> bool:
    resolved = path.expanduser().resolve()
    return resolved == folder or folder in resolved.parents


def _probe_writable(folder: Path) -> None:
    with tempfile.TemporaryFile(dir=folder):
        pass


def docs_figures_dir() -> Path:
    """The checkout's ``docs/figures``: the committed figures, written only with ``--update-docs-figures``."""
    return package_dir().parent.parent / "docs" / "figures"


def add_update_docs_figures_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--update-docs-figures", action="store_true",
                        help="allow --out / --json inside the checkout's docs/figures (refresh the committed figures)")


def _refuse_docs_figures(path: Path, option: str, update_docs_figures: bool) -> None:
    if not update_docs_figures and is_inside(path, docs_figures_dir().resolve()):
        raise UsageError(
            f"argument {option}: {path} is in docs/figures, the committed figures; write elsewhere, or add "
            "--update-docs-figures to refresh them"
        )


def prepare_out_dir(path: Path, option: str = "--out", *, update_docs_figures: bool = False) -> Path:
    """Create ``path`` (a folder) if needed and check that files can be written into it; the committed
    figures (``docs/figures``) only with ``update_docs_figures``."""
    path = Path(path).expanduser()
    _refuse_docs_figures(path, option, update_docs_figures)
    if is_inside(path, package_dir()):
        raise UsageError(f"argument {option}: {path} is inside the installed stepcache package; choose another folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        _probe_writable(path)
    except OSError as err:
        raise UsageError(f"argument {option}: cannot write into the folder {path}: {err.strerror or err}") from None
    return path


def prepare_out_file(path: Path, option: str = "--json", *, update_docs_figures: bool = False) -> Path:
    """Check that the file ``path`` can be written (its folder is created if needed); nothing is written yet."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"argument {option}: {path} is a folder; allowed: a file path, e.g. {path / 'results.json'}")
    _refuse_docs_figures(path, option, update_docs_figures)
    prepare_out_dir(path.parent, option, update_docs_figures=update_docs_figures)
    return path


def set_torch_threads(threads: int | None) -> None:
    """Set torch's intra-op thread count for this process (None: leave torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# -- outputs -------------------------------------------------------------------------------------


def command_line(args: argparse.Namespace | None = None) -> str:
    """The command as the user typed it (``cli.main`` records it), else this process's argv, with absolute
    paths made relative to the working directory: nothing machine-specific goes into a result file."""
    recorded = getattr(args, "command_line", None)
    words = shlex.split(recorded) if recorded is not None else sys.argv
    return shlex.join(relative_path_text(word) for word in words)


def relative_path_text(word: str) -> str:
    """``word`` with an absolute path in it (``/a/b``, ``--out=/a/b``) made relative to the working directory."""
    prefix, _, path = word.rpartition("=") if "=" in word else ("", "", word)
    if not os.path.isabs(path):
        return word
    return prefix + ("=" if prefix else "") + os.path.relpath(path)


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution (e.g. ``"cache-dit"``), or None where it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def run_metadata(args: argparse.Namespace | None = None, *, device: str = "cpu") -> dict[str, Any]:
    """What produced a result: versions, device, torch threads, the command line and the date (ISO 8601)."""
    import torch

    return {
        "stepcache": stepcache.__version__,
        "torch": torch.__version__,
        "diffusers": installed_version("diffusers"),
        "python": platform.python_version(),
        "device": device,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "command": command_line(args),
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def write_json(path: Path, document: dict[str, Any]) -> Path:
    """Write ``document`` as indented JSON (non-finite numbers as null) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_json_safe(document), indent=2) + "\n")
    return path


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, Path):
        return str(value)
    return value


def format_number(value: float | None, digits: int = 4) -> str:
    """``digits`` significant digits; scientific notation below 1e-3, so a small value never reads as 0.0000."""
    if value is None:
        return "-"
    value = float(value)
    if value == 0.0 or not math.isfinite(value):
        return "0" if value == 0.0 else str(value)
    if abs(value) < 1e-3:
        return f"{value:.{digits - 1}e}"
    if abs(value) >= 10**digits:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"


def show_progress(args: argparse.Namespace) -> bool:
    """Progress unless ``--no-progress`` was given: a bar on a terminal, plain lines otherwise."""
    return not getattr(args, "no_progress", False)


# Off a terminal, the longest silence between progress lines while units keep finishing.
PROGRESS_INTERVAL_S = 30.0


def duration(seconds: float) -> str:
    """``45s``, ``3m20s``, ``1h05m``: short enough for a progress line."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class ProgressLines:
    """Progress as plain lines on stderr, for a pipe, a log file or CI, where a bar is unreadable.

    Speaks tqdm's subset that the tools use (``n``, ``update``, ``set_postfix(_str)``, ``close``,
    iteration, ``with``). A line is written when the job starts, and when a unit finishes: always for
    the first and the last, otherwise only once ``interval_s`` passed since the previous line (0: every
    unit, for jobs whose units are long), so a log gets news at least that often without one line per
    training step. Within a long unit, ``update(0)`` (a caller's news, such as the next benchmark row
    starting) writes a line when none was written for :data:`PROGRESS_INTERVAL_S`, and the heartbeat
    writes one when the log has been quiet for ``heartbeat_s``.
    """

    def __init__(self, iterable: Iterable[Any] | None = None, *, total: int, desc: str, unit: str,
                 interval_s: float = PROGRESS_INTERVAL_S, file: Any = None, clock: Any = None,
                 heartbeat_s: float | None = PROGRESS_INTERVAL_S) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.interval_s = interval_s
        self.file = file if file is not None else sys.stderr  # bound now: the heartbeat writes where the job did
        self.clock = clock or time.monotonic
        self.start = self.clock()
        self.n = 0
        self.postfix = ""
        self._last_line: float | None = None
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._write(self.start)  # what started, before the first (possibly long) unit
        # A unit can outlast the interval (one bench sample, one verification): a daemon thread writes a
        # line whenever the log has been quiet for heartbeat_s, until the last unit or close().
        if heartbeat_s and clock is None:
            threading.Thread(target=self._heartbeat, args=(heartbeat_s,), daemon=True,
                             name="stepcache-progress").start()

    def __iter__(self) -> Any:
        try:
            for item in self.iterable or ():
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> ProgressLines:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = str(text)

    def set_postfix(self, values: dict[str, Any] | None = None, **more: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in {**(values or {}), **more}.items())

    def update(self, n: int = 1) -> None:
        """``n`` more units done; ``update(0)`` is news without a finished unit (a message in a long phase)."""
        with self._lock:
            now = self.clock()
            since = now - (self.start if self._last_line is None else self._last_line)
            if n <= 0:
                # Within a long unit: a line only when the log has been quiet for PROGRESS_INTERVAL_S.
                if since >= PROGRESS_INTERVAL_S:
                    self._write(now)
                return
            first = self.n == 0  # its line gives the first estimate of what is left
            self.n += n
            if first or self.n >= self.total or since >= self.interval_s:
                self._write(now)
            if self.n >= self.total:
                self._stopped.set()

    def _heartbeat(self, every_s: float) -> None:
        # Wakes when the quiet would reach every_s (not on a fixed tick, which would add up to a tick).
        wait = every_s
        while not self._stopped.wait(wait):
            with self._lock:
                now = self.clock()
                quiet = now - (self.start if self._last_line is None else self._last_line)
                if quiet < every_s:
                    wait = every_s - quiet
                    continue
                wait = every_s
                if not self._stopped.is_set():
                    try:
                        self._write(now)
                    except (OSError, ValueError):  # the stream was closed under a bar nobody closed
                        return

    def line(self, now: float) -> str:
        """``bench: 3/12 phases, 1m20s elapsed, about 3m40s left (note)``."""
        elapsed = now - self.start
        done = min(self.n, self.total)
        text = f"{self.desc}: {done}/{self.total} {self.unit}, {duration(elapsed)} elapsed"
        if done >= self.total:
            text += ", done"
        elif done > 0:
            text += f", about {duration(elapsed / done * (self.total - done))} left"
        return text + (f" ({self.postfix})" if self.postfix else "")

    def _write(self, now: float) -> None:
        self._last_line = now
        print(self.line(now), file=self.file, flush=True)

    def close(self) -> None:
        self._stopped.set()  # ends the heartbeat; tqdm's interface


def progress_bar(iterable: Iterable[Any] | None = None, *, total: int, desc: str, unit: str, enabled: bool,
                 interval_s: float = PROGRESS_INTERVAL_S) -> Any:
    """Progress on stderr for ``total`` units: a tqdm bar on a terminal, :class:`ProgressLines` off one
    (at most one line per ``interval_s``; 0 for a line per unit), nothing when ``enabled`` is False."""
    from tqdm.auto import tqdm

    if enabled and not sys.stderr.isatty():
        return ProgressLines(iterable, total=total, desc=desc, unit=unit, interval_s=interval_s)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)
