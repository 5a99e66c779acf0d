"""The docs run as written: every Python block of the README and of the docs below is executed, every
command of their shell blocks is resolved (the executable is where the setup puts it) and parsed with
its real arguments, and the shell blocks that finish in seconds are run.

A Python block is run unless the HTML comment on the line before it (blank lines allowed) says otherwise:

- ``<!-- fragment: WHY -->``: not runnable on its own (names the reader supplies); only compiled;
- ``<!-- not run: WHY -->``: runnable, but needs what tests cannot have (downloads, a GPU); compiled;
- ``<!-- continues the previous block -->``: runs in the namespace the previous block left.

A shell block is resolved and parsed only (most take minutes; their durations are in the docs, measured
on the development machine), unless it is marked ``<!-- runs in tests -->``: then it is also run, with
bash, as written.

Blocks run in a temporary working directory (what they write stays out of the checkout), with one
torch thread; a shell block's working directory links the checkout's ``.venv``, ``docs``, ``examples``
and ``benchmarks``, so its paths read as they do from the repository root, and no tracked file may
change while it runs.
"""

from __future__ import annotations

import re
import runpy
import shlex
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = (
    "README.md", "docs/diffusers.md", "docs/dreamzero.md", "docs/serving.md", "docs/distributed.md",
    "docs/benchmarks.md",
)
QUICK_START = "bash scripts/setup.sh && .venv/bin/stepcache demo\n.venv/bin/python -m pytest\n"

FRAGMENT, NOT_RUN, CONTINUES, RUN = "fragment", "not run", "continues the previous block", "run"
RUNS_IN_TESTS = "runs in tests"  # a shell block that finishes in seconds
_MARKER = re.compile(
    r"^<!--\s*(fragment|not run|continues the previous block|runs in tests)\s*(?::\s*(.*?))?\s*-->$"
)
# What a shell block's working directory links from the checkout: what the docs' commands read.
SHELL_BLOCK_LINKS = (".venv", "docs", "examples", "benchmarks")
SHELL_BLOCK_TIMEOUT_S = 180
_FENCE = re.compile(r"^\s*```(\S*)\s*$")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    language: str
    code: str
    mode: str  # RUN, FRAGMENT, NOT_RUN, CONTINUES or (a shell block) RUNS_IN_TESTS
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.doc}:{self.line}"


def code_blocks(doc: str) -> list[Block]:
    """The fenced code blocks of ``doc`` (relative to the repository root), with their markers."""
    lines = (ROOT / doc).read_text().splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        language = opening.group(1)
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{doc}:{index + 1}: a code block that is never closed")
        code = textwrap.dedent("\n".join(lines[index + 1 : end])) + "\n"
        mode, reason = RUN, ""
        before = index - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        marker = _MARKER.match(lines[before].strip()) if before >= 0 else None
        if marker is not None:
            mode, reason = marker.group(1), marker.group(2) or ""
        blocks.append(Block(doc, index + 1, language, code, mode, reason))
        index = end + 1
    return blocks


def _runnable_chains() -> list[list[Block]]:
    """Python blocks to run, each with the blocks that continue it."""
    chains: list[list[Block]] = []
    for doc in DOCS:
        previous: list[Block] | None = None
        for block in code_blocks(doc):
            if block.language != "python":
                continue
            if block.mode == CONTINUES:
                assert previous is not None, f"{block.name} continues a block that is not run"
                previous.append(block)
            elif block.mode == RUN:
                previous = [block]
                chains.append(previous)
            else:
                previous = None
    return chains


def _all_blocks() -> list[Block]:
    return [block for doc in DOCS for block in code_blocks(doc)]


@pytest.fixture
def one_thread_in_a_scratch_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tmp_path
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("chain", _runnable_chains(), ids=lambda chain: chain[0].name)
def test_python_block_runs_as_written(chain: list[Block], one_thread_in_a_scratch_folder: Path) -> None:
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    for block in chain:
        exec(compile(block.code, block.name, "exec"), namespace)  # the docs' own examples


@pytest.mark.parametrize(
    "block", [b for b in _all_blocks() if b.language == "python" and b.mode in (FRAGMENT, NOT_RUN)],
    ids=lambda block: block.name,
)
def test_blocks_that_are_not_run_still_compile_and_say_why(block: Block) -> None:
    assert block.reason, f"{block.name}: say why it is not run (<!-- {block.mode}: WHY -->)"
    compile(block.code, block.name, "exec")


def test_every_block_is_marked_with_a_known_marker() -> None:
    for doc in DOCS:
        for number, line in enumerate((ROOT / doc).read_text().splitlines(), start=1):
            if line.strip().startswith("<!--") and any(word in line for word in ("run", "fragment", "continue")):
                assert _MARKER.match(line.strip()), f"{doc}:{number}: unknown doc-test marker {line.strip()!r}"
    for block in _all_blocks():
        assert (block.mode == RUNS_IN_TESTS) <= (block.language == "bash"), (
            f"{block.name}: <!-- {RUNS_IN_TESTS} --> marks shell blocks; a Python block runs unless marked otherwise"
        )


def _stepcache_commands(block: Block) -> Iterator[list[str]]:
    """The ``stepcache ...`` command lines of a shell block, as argument lists (shell operators cut)."""
    text = block.code.replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        for operator in ("&&", "&", "|", ";", "||"):
            if operator in words:
                words = words[: words.index(operator)]
        if words and Path(words[0]).name == "stepcache":
            yield words[1:]


@pytest.mark.parametrize(
    "block", [b for b in _all_blocks() if b.language == "bash"], ids=lambda block: block.name
)
def test_command_lines_parse(block: Block, capsys: pytest.CaptureFixture[str]) -> None:
    """As ``stepcache`` parses them (``cli.main``): the subcommand first, then the tool's own options;
    nothing is validated or run. A deprecated spelling fails too."""
    import importlib

    from stepcache.tools.cli import _build_parser, _subparser
    from stepcache.tools.common import UsageError, checked_cache_config

    for words in _stepcache_commands(block):
        parser = _build_parser()
        try:
            known, _ = parser.parse_known_args(words)
            importlib.import_module(known._module).add_arguments(_subparser(parser, known.command))
            args = parser.parse_args(words)
        except SystemExit as exit_info:
            if exit_info.code == 0 and {"-h", "--help"} & set(words):
                capsys.readouterr()  # the help text
                continue
            raise AssertionError(f"{block.name}: `stepcache {shlex.join(words)}` does not parse") from exit_info
        # A --cache-config is read as the tool reads it (JSON, a preset or a file), except a file that an
        # earlier command of the docs writes.
        value = getattr(args, "cache_config", None)
        if isinstance(value, str) and not (value.endswith(".json") and not Path(value).exists()):
            try:
                checked_cache_config(value)
            except UsageError as err:
                raise AssertionError(f"{block.name}: `stepcache {shlex.join(words)}`: {err}") from None
        warning = capsys.readouterr().err
        assert "deprecated" not in warning, f"{block.name}: `stepcache {shlex.join(words)}`: {warning.strip()}"


# What a shell block may call by bare name: the shell and tools a POSIX system has. Everything of this
# project's (stepcache, python with torch, torchrun, pip) is under .venv/bin, which the setup does not put
# on PATH.
SYSTEM_TOOLS = {"bash", "cd", "curl", "kill", "wait", "cat", "mkdir", "ls", "python3", "git"}
_VENV_TOOLS = {"stepcache", "python", "torchrun", "pip"}


def _shell_commands(block: Block) -> Iterator[list[str]]:
    """Every simple command of a shell block, as an argument list: cut at operators, leading ``VAR=value``
    assignments dropped, the inner command of ``VAR=$(...)`` included."""
    text = block.code.replace("\\\n", " ")
    for line in text.splitlines():
        line = re.sub(r"^\s*\w+=\$\((.*)\)\s*$", r"\1", line)
        command: list[str] = []
        for word in [*shlex.split(line, comments=True), ";"]:
            if word in ("&&", "&", "|", ";", "||", ">", "<"):
                while command and re.match(r"^\w+=", command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = [] if word not in (">", "<") else [">"]
            elif command != [">"]:
                command.append(word)
            else:
                command = ["ignored"]  # a redirection's target


class _Parsed(Exception):
    """A script's argparse parsed its arguments: stop before it does any work."""


def _parse_script_arguments(script: Path, arguments: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``script`` only as far as its own ``parse_args`` (which exits on a bad argument)."""
    import argparse
    import runpy
    import sys

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, args=None, namespace=None):
        original(parser, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *arguments])
    with pytest.raises(_Parsed):
        runpy.run_path(str(script), run_name="__main__")


def _check_command(words: list[str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    import tomllib

    head, rest = words[0], words[1:]
    if head == "ignored":
        return
    if head in _VENV_TOOLS:
        raise AssertionError(f"{where}: `{shlex.join(words)}`: bare {head!r} is not on PATH after the setup; "
                             f"write .venv/bin/{head}")
    if "/" not in head:
        assert head in SYSTEM_TOOLS, f"{where}: `{shlex.join(words)}`: unknown command {head!r}"
        if head == "bash":
            assert (ROOT / rest[0]).is_file(), f"{where}: no script {rest[0]}"
        return
    assert (ROOT / head).exists() or head.startswith(".venv/bin/"), f"{where}: no {head}"
    name = Path(head).name
    if name == "stepcache":
        return  # test_command_lines_parse parses these
    if name == "pip":
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for word in rest:
            match = re.fullmatch(r"\.\[([\w,]+)\]", word)
            if match:
                unknown = set(match[1].split(",")) - set(extras)
                assert not unknown, f"{where}: `{shlex.join(words)}`: no extra(s) {sorted(unknown)}"
        return
    if name == "torchrun":
        from torch.distributed.run import get_args_parser

        torchrun = get_args_parser().parse_args(rest)
        script, arguments = torchrun.training_script, torchrun.training_script_args
    elif name == "python":
        if rest[0] == "-c":
            compile(rest[1], where, "exec")
            return
        if rest[0] == "-m":
            assert importlib.util.find_spec(rest[1]) is not None, f"{where}: no module {rest[1]}"
            return
        script, arguments = rest[0], rest[1:]
    else:
        raise AssertionError(f"{where}: `{shlex.join(words)}`: no check for {head}")
    assert (ROOT / script).is_file(), f"{where}: no script {script}"
    source = (ROOT / script).read_text()
    if "argparse" not in source:  # a script without options: it must be given none
        compile(source, script, "exec")
        assert not arguments, f"{where}: `{shlex.join(words)}`: {script} takes no arguments"
        return
    try:
        _parse_script_arguments(ROOT / script, arguments, monkeypatch)
    except SystemExit as exit_info:
        raise AssertionError(f"{where}: `{shlex.join(words)}` does not parse") from exit_info


@pytest.mark.parametrize(
    "block", [b for b in _all_blocks() if b.language == "bash"], ids=lambda block: block.name
)
def test_shell_commands_resolve_and_parse(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command names an executable where the setup puts it, and a script's arguments parse with
    its own parser (nothing runs past the parse)."""
    for words in _shell_commands(block):
        with monkeypatch.context() as patch:
            _check_command(words, block.name, patch)


def _tracked_changes() -> str | None:
    """``git status`` of the checkout's tracked files (None where it is not a git checkout)."""
    try:
        status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return status.stdout if status.returncode == 0 else None


def run_shell_block(block: Block, folder: Path) -> subprocess.CompletedProcess[str]:
    """Run ``block`` with bash in ``folder`` (the checkout's :data:`SHELL_BLOCK_LINKS` linked into it), as
    written: stop at the first failing command. The checkout's ``src`` is first on the import path, so
    the commands run the code under test, with one torch thread."""
    import os
    import sys

    for name in SHELL_BLOCK_LINKS:
        target = ROOT / name
        if name == ".venv" and not target.exists():  # a venv elsewhere (STEPCACHE_VENV): the one running us
            target = Path(sys.prefix)
        (folder / name).symlink_to(target, target_is_directory=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block.code], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=SHELL_BLOCK_TIMEOUT_S)


@pytest.mark.parametrize(
    "block", [b for b in _all_blocks() if b.mode == RUNS_IN_TESTS], ids=lambda block: block.name
)
def test_cheap_shell_blocks_run_as_written(block: Block, tmp_path: Path) -> None:
    """A block marked as running in tests exits 0, and writes nothing into the checkout's tracked files."""
    before = _tracked_changes()
    done = run_shell_block(block, tmp_path)
    assert done.returncode == 0, (
        f"{block.name}: exit status {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    )
    assert _tracked_changes() == before, f"{block.name} changed tracked files of the checkout"


def test_a_failing_command_fails_its_shell_block(tmp_path: Path) -> None:
    block = Block("test", 1, "bash", ".venv/bin/stepcache generate --steps 0\necho not reached\n", RUNS_IN_TESTS)
    done = run_shell_block(block, tmp_path)
    assert done.returncode == 2 and "not reached" not in done.stdout and "--steps" in done.stderr


def test_shell_command_check_fails_on_what_a_newcomer_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    for words, message in [
        (["stepcache", "serve"], "bare 'stepcache'"),
        (["torchrun", "--nproc-per-node", "2", "examples/distributed_loop.py"], "bare 'torchrun'"),
        ([".venv/bin/pip", "install", "-e", ".[serving]"], "no extra"),
        ([".venv/bin/python", "examples/distributed_loop.py", "--no-such-option"], "does not parse"),
        ([".venv/bin/python", "benchmarks/missing.py"], "no script"),
    ]:
        with pytest.raises(AssertionError, match=message):
            _check_command(words, "test", monkeypatch)


def test_readme_starts_with_the_two_quick_start_commands() -> None:
    first = next(block for block in code_blocks("README.md"))
    assert first.language == "bash" and first.code == QUICK_START


def test_the_linked_complete_loop_example_runs(one_thread_in_a_scratch_folder: Path, capsys) -> None:
    runpy.run_path(str(ROOT / "examples" / "euler_loop.py"), run_name="__main__")
    assert "forwards" in capsys.readouterr().out


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@pytest.mark.parametrize("doc", DOCS)
def test_local_links_and_anchors_exist(doc: str) -> None:
    text = (ROOT / doc).read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (ROOT / doc).parent / path if path else ROOT / doc
        assert linked.exists(), f"{doc}: link to a missing file {target}"
        if anchor and linked.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, f"{doc}: no heading for #{anchor} in {linked.name}"
