"""Every example in README.md and docs/*.md runs, so none goes stale.

Each markdown file is executed top to bottom in a fresh temporary directory:

* a block whose info string is ``file=NAME`` (```` ```toml file=run.toml ````) is written
  to NAME;
* a plain ```` ```python ```` block is executed;
* in a ```` ```console ```` block every ``$ `` line is a command. Its ``&&``-separated
  parts that call ``roost`` are run with :func:`roost.cli.main` and must exit 0; setup
  parts (``python3 -m venv``, ``pip install``, ``pytest``) are what CI itself runs and are
  skipped here; a ``torchrun`` command runs as a subprocess. Lines after a command, up to
  the next command, are its expected output, compared exactly. A command that ends in a
  shell comment ``# exit N`` must exit with code N instead (its last ``&&`` part: a run
  documented to diverge is ``# exit 1``);
* a console command ending in `` &`` runs in the background, as a subprocess
  (``python -m roost ...``), like a shell job; ``$ sleep S`` waits, ``$ kill -9 %N`` kills
  the block's N-th background command (numbered from 1 in the block, as a shell numbers
  its jobs), and ``$ wait`` waits for the block's background commands, each of which must
  exit 0 (a killed one excepted). Background commands still running when the block ends
  are killed and fail the test;
* a ```` ```console slow ```` block holds commands that take minutes (the experiments of
  docs/experiments.md). The default test skips it; :func:`test_slow_examples_in_the_doc_run`
  (marked ``slow``, run by .ci/run) runs such a doc top to bottom with its slow blocks
  included; docs/experiments.md's (about 3 hours) also carry ``experiment`` and run only
  with ``pytest -m experiment``.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from roost.cli import main
from roost.config import component_registries

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.S | re.M)
SHARED_PATH = re.compile(r"/work/shared/data/[\w./-]*[\w/]")
EXPECTED_EXIT = re.compile(r"\s+#\s*exit (\d+)\b.*$")
SETUP = ("python3 -m venv", ".venv/bin/pip", "pip install", ".venv/bin/python -m pytest")


def blocks(text: str) -> list[tuple[str, str, str]]:
    return [(m.group(1), m.group(2).strip(), m.group(3)) for m in FENCE.finditer(text)]


def console_commands(body: str) -> list[tuple[str, list[str]]]:
    """``[(command, expected output lines)]`` of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


def roost_argv(part: str) -> list[str] | None:
    words = shlex.split(part)
    if words and words[0] in ("roost", ".venv/bin/roost"):
        return words[1:]
    assert part.strip().startswith(SETUP), f"documented command is neither roost nor setup: {part}"
    return None


def run_torchrun(command: str) -> None:
    """``torchrun ...`` runs for real, as a subprocess (it starts its own processes)."""
    words = shlex.split(command)
    argv = [sys.executable, "-m", "torch.distributed.run", *words[1:], "--quiet"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"`{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"


class Jobs:
    """A console block's background commands (see the module docstring)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed: set[int] = set()

    def start(self, command: str) -> None:
        argv = roost_argv(command)
        assert argv is not None, f"only roost commands run in the background: {command}"
        log = self.logs / f"job-{len(self.procs) + 1}.log"
        extra = ["--quiet"] if argv[:1] in (["run"], ["serve"]) else []
        cmd = [sys.executable, "-m", "roost", *argv, *extra]
        self.procs.append(subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT))

    def run(self, command: str) -> bool:
        """Run a job-control command; False if ``command`` is not one."""
        words = shlex.split(command)
        if words[:1] == ["sleep"]:
            time.sleep(float(words[1]))
        elif words[:2] == ["kill", "-9"] and len(words) == 3 and words[2].startswith("%"):
            n = int(words[2][1:])
            self.procs[n - 1].send_signal(signal.SIGKILL)
            self.procs[n - 1].wait(30)
            self.killed.add(n)
        elif words == ["wait"]:
            self.wait()
        else:
            return False
        return True

    def log(self, n: int) -> str:
        return (self.logs / f"job-{n}.log").read_text(errors="replace")[-3000:]

    def wait(self, timeout_s: float = 600.0) -> None:
        for n, proc in enumerate(self.procs, 1):
            if n in self.killed:
                continue
            code = proc.wait(timeout_s)
            assert code == 0, f"background command {n} exited {code}:\n{self.log(n)}"

    def close(self, check: bool = True) -> None:
        running = [n for n, p in enumerate(self.procs, 1) if p.poll() is None]
        for n in running:
            self.procs[n - 1].kill()
            self.procs[n - 1].wait(30)
        assert not check or not running, f"background commands {running} still ran at the end"


def run_console(command: str, expected: list[str]) -> None:
    want = 0
    if m := EXPECTED_EXIT.search(command):
        want, command = int(m.group(1)), command[: m.start()]
    parts = command.split("&&")
    for i, part in enumerate(parts):
        argv = roost_argv(part.strip())
        if argv is None:
            continue
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main([*argv, "--quiet"] if argv[:1] in (["run"], ["serve"]) else argv)
        wanted = want if i == len(parts) - 1 else 0
        assert code == wanted, f"`{part.strip()}` exited {code}, not {wanted}"
        if expected:
            assert stdout.getvalue().rstrip("\n").splitlines() == expected, part


@pytest.fixture
def isolated_registries(monkeypatch):
    """Examples register their own algorithms and loaders; undo that after each doc."""
    for registry in component_registries().values():
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("roost_plugin_"):
            del sys.modules[name]


def run_doc(doc: Path, *, slow: bool) -> int:
    """Run the doc's examples top to bottom in the current directory; ``slow`` blocks only
    when ``slow``. Returns how many blocks ran."""
    found = 0
    for lang, info, body in blocks(doc.read_text()):
        if info.startswith("file="):
            Path(info.removeprefix("file=")).write_text(body)
        elif lang == "python":
            exec(compile(body, f"{doc.name}:python", "exec"), {"__name__": "__doc_example__"})
        elif lang == "console":
            if is_slow(lang, info) and not slow:
                continue
            jobs = Jobs(Path.cwd())
            try:
                for command, expected in console_commands(body):
                    if command.rstrip().endswith(" &"):
                        jobs.start(command.rstrip()[:-2])
                    elif jobs.run(command):
                        pass
                    elif command.startswith("torchrun "):
                        run_torchrun(command)
                    else:
                        run_console(command, expected)
            except BaseException:
                jobs.close(check=False)
                raise
            jobs.close()
        else:
            continue
        found += 1
    return found


def is_slow(lang: str, info: str) -> bool:
    return lang == "console" and info.split() == ["slow"]


def has_slow_blocks(doc: Path) -> bool:
    return any(is_slow(lang, info) for lang, info, _ in blocks(doc.read_text()))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_example_in_the_doc_runs(doc, tmp_path, monkeypatch, isolated_registries):
    monkeypatch.chdir(tmp_path)
    found = run_doc(doc, slow=False)
    assert found > 0 or doc.name == "benchmarks.md", f"{doc.name} has no runnable example"
    if doc.name == "README.md":
        assert_git_ignores_everything_in(tmp_path)


def _slow_doc_param(doc: Path) -> object:
    """docs/experiments.md's blocks take about 3 hours: marked ``experiment`` as well,
    so that .ci/run's slow pass leaves them to a run by hand (``pytest -m experiment``)."""
    marks = [pytest.mark.experiment] if doc.name == "experiments.md" else []
    return pytest.param(doc, marks=marks, id=doc.name)


@pytest.mark.slow
@pytest.mark.parametrize("doc", [_slow_doc_param(d) for d in DOCS if has_slow_blocks(d)] or [None])
def test_slow_examples_in_the_doc_run(doc, tmp_path, monkeypatch, isolated_registries):
    """The ```` ```console slow ```` blocks (minutes each), with the rest of their doc. A doc
    whose commands read files of the shared data folder skips where that folder is absent."""
    if doc is None:
        pytest.skip("no doc has a slow block")
    missing = sorted({p for p in SHARED_PATH.findall(doc.read_text()) if not Path(p).exists()})
    if missing:
        pytest.skip(f"needs the shared data: {', '.join(missing)}")
    monkeypatch.chdir(tmp_path)
    runnable = [
        1
        for lang, info, _ in blocks(doc.read_text())
        if info.startswith("file=") or lang in ("python", "console")
    ]
    # every block ran, the slow ones included (a failing command raises inside run_doc)
    assert run_doc(doc, slow=True) == len(runnable)


def test_the_default_run_skips_slow_blocks(tmp_path, monkeypatch):
    """A slow block is not run by the default test (here it would fail), a plain one is."""
    monkeypatch.chdir(tmp_path)
    doc = tmp_path / "page.md"
    doc.write_text(
        "```console slow\n$ roost run no-such-preset --out runs/x\n```\n\n"
        "```console\n$ roost list partition\n```\n"
    )
    assert run_doc(doc, slow=False) == 1
    with pytest.raises(AssertionError, match="no-such-preset"):
        run_doc(doc, slow=True)


def test_a_command_may_be_documented_to_fail():
    """``# exit N`` after a command: it must exit N (here 2, a preset that does not exist)."""
    run_console("roost run no-such-preset --out runs/x  # exit 2: no such preset", [])
    with pytest.raises(AssertionError, match="exited 2, not 1"):
        run_console("roost run no-such-preset --out runs/x  # exit 1", [])


def assert_git_ignores_everything_in(folder: Path) -> None:
    """Everything the README's commands created is ignored by the repository's .gitignore,
    so a newcomer following the tour in a clone sees a clean ``git status``."""
    (folder / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    subprocess.run(["git", "init", "-q", str(folder)], check=True)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all"],
        cwd=folder,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert status == ["?? .gitignore"], status


def test_readme_opens_with_the_demo_and_the_test_command():
    first = blocks((ROOT / "README.md").read_text())[0]
    commands = [c for c, _ in console_commands(first[2])]
    assert commands[0].endswith("roost run quickstart --out runs/quickstart")
    assert commands[1].endswith(".venv/bin/python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, ".ci/run must run the README's test command"
