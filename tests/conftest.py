"""Shared fixtures: the real MNIST, found where a user keeps it (or downloaded once), and the example script.

Where the tests look, in order: ``$MNIST_ROOT``, ``../shared/data`` beside the checkout, ``./data``
(the script's default ``--data-dir``). Found nowhere, torchvision downloads it into ``./data`` once;
when that fails too, the tests that need it are skipped (a failure under ``CI=true``) and the
session ends with one line saying how many and how to provide the data.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest

from tests import forkserver

if os.environ.get("PYTEST_XDIST_WORKER"):
    # one torch thread per test worker (and per process it starts): `-n 2` on 2 cores runs two tests
    # at once instead of two threads fighting for each core; set OMP_NUM_THREADS yourself to override
    os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_mnist.py"
MNIST_FILES = [f"{p}-{k}-idx{3 if k == 'images' else 1}-ubyte" for p in ("train", "t10k") for k in ("images", "labels")]
_found: dict[str, object] = {}  # "root": Path or None, "reason": why not, once per session
NOT_FOUND = "MNIST not found and not downloadable"
# a run's stop signals (handlers.signals.STOP_SIGNALS; not imported here: torch must not start before the above)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _holds_mnist(folder: Path) -> bool:
    raw = folder / "MNIST" / "raw"
    return all((raw / name).is_file() for name in MNIST_FILES)


def find_mnist() -> Path | None:
    """The first folder holding all of MNIST/raw: $MNIST_ROOT, ../shared/data, ./data."""
    for candidate in (os.environ.get("MNIST_ROOT"), ROOT.parent / "shared" / "data", ROOT / "data"):
        if candidate and _holds_mnist(Path(candidate)):
            return Path(candidate).resolve()
    return None


def _download() -> tuple[Path | None, str]:
    """torchvision's download into ./data, as `make train` does; (folder or None, why not)."""
    import torchvision

    target = ROOT / "data"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            for train in (True, False):
                torchvision.datasets.MNIST(str(target), train=train, download=True)
    except Exception as exc:  # offline, proxy, disk
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
    return (target.resolve(), "") if _holds_mnist(target) else (None, "the download left no MNIST/raw")


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The folder holding MNIST/raw. Nowhere and not downloadable: skipped locally, a failure under CI=true."""
    if "root" not in _found:
        root = find_mnist()
        reason = ""
        if root is None:
            root, reason = _download()
        _found.update(root=root, reason=reason)
    if _found["root"] is None:
        message = f"{NOT_FOUND} ({_found['reason']})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return _found["root"]  # type: ignore[return-value]


# Module fixtures that run training processes: under ``-n`` (``--dist loadgroup``) the tests that share
# one stay on one worker, which then computes it once.
SHARED_RUNS = ("uninterrupted", "killed_every_7", "run_dir")
# The longest tests (150 batches of the seed preset, every bit flip of a file, the torchrun references):
# started first, so that no worker is left with one of them at the end (tests/test_suite.py checks
# that each name still starts a test's).
LONGEST = ("test_seed_preset_", "test_every_one_of_the_files_single_bit_flips",
           "test_torchrun_restarts_a_killed_worker", "test_the_installed_wheel_trains")


def shared_run(item) -> str | None:
    """The module fixture of reference runs that ``item`` reads, if any (its xdist group)."""
    return next((name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())), None)


def pytest_itemcollected(item) -> None:
    """The tests reading one module's reference runs go to one worker (``--dist loadgroup``), which
    computes them once: marked as each is collected, before any ``pytest_collection_modifyitems``
    (xdist's reads the marks in its own)."""
    shared = shared_run(item)
    if shared is not None:
        item.add_marker(pytest.mark.xdist_group(shared))


def pytest_collection_modifyitems(items: list) -> None:
    """The longest first, then the other real runs (``slow``), unit tests last: with ``-n`` the short
    ones fill in at the end instead of a long one starting when the other worker is already idle."""
    def key(index: int, item) -> tuple[int, bool, int]:
        longest = next((i for i, name in enumerate(LONGEST) if item.name.startswith(name)), len(LONGEST))
        return longest, item.get_closest_marker("slow") is None, index

    keys = {item: key(index, item) for index, item in enumerate(items)}
    group_of = {item: group for item in items if (group := shared_run(item)) is not None}
    # a group's tests sort together (at its first member's place), so that its module fixture is set
    # up once, not again after each test of another module in between
    first: dict[str, tuple] = {}
    for item, group in group_of.items():
        first[group] = min(first.get(group, keys[item]), keys[item])
    items.sort(key=lambda item: first[group_of[item]] if item in group_of else keys[item])


@pytest.fixture(autouse=True)
def _signal_handlers_put_back():
    """``cli.main`` keeps its stop signals' handlers until its process exits: a test that calls it in this
    process gets the worker's own back afterwards, as the next process would start with them."""
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


NO_GPU = "needs a CUDA GPU: torch.cuda.is_available() is False on this machine"


def pytest_runtest_setup(item) -> None:
    """Tests marked ``gpu`` run where CUDA is; elsewhere they are skipped with one line (no CUDA is started)."""
    if item.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip(NO_GPU)


def pytest_terminal_summary(terminalreporter) -> None:
    reasons = [str(getattr(r, "longrepr", "")) for r in terminalreporter.stats.get("skipped", [])]
    skipped = sum(NOT_FOUND in reason for reason in reasons)
    if skipped:
        terminalreporter.write_line(
            f"{skipped} tests skipped for want of MNIST: put the four IDX files in ./data/MNIST/raw "
            f"(or set MNIST_ROOT to a folder holding MNIST/raw), or run once where the download works",
            yellow=True, bold=True)


def in_process(main: Callable[[list[str]], int], argv: list[str],
               env: dict | None = None) -> subprocess.CompletedProcess:
    """``main(argv)`` (a program's ``cli.main``) run in this process, its output captured as a process's:
    for the runs whose process is not what a test is about (an uninterrupted reference run, the
    second case of a refusal already tested as a real process). ``MNIST_ROOT`` is unset meanwhile, as
    ``run_script`` unsets it, and ``env`` set; both, torch's thread count (``--threads``) and the signal
    handlers (a program's stay until its process exits) are put back afterwards."""
    import torch  # here, not at the top: a worker's OMP_NUM_THREADS is set before torch starts

    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}  # cli.main's stay until exit
    with mock.patch.dict(os.environ, env or {}), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        os.environ.pop("MNIST_ROOT", None)  # the whole environment is put back on leaving
        try:
            code = main(list(argv))
        except SystemExit as stop:  # the parser's own exit (--help)
            code = stop.code if isinstance(stop.code, int) else 1
        finally:
            torch.set_num_threads(threads)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@functools.cache
def _example(path: Path) -> ModuleType:
    """An example script imported as a module (its ``__main__`` block does not run), once a worker."""
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # where its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def run_main(*args: str, mnist: Path | None) -> subprocess.CompletedProcess:
    """examples/train_mnist.py's ``cli.main`` in this process (see :func:`in_process`), with the
    arguments ``run_script`` would give the script."""
    example = _example(SCRIPT)
    argv = [*args, *(["--data-dir", str(mnist)] if mnist is not None else [])]
    return in_process(lambda a: example.cli.main(example.train, example.build_parser(), example.MnistSettings,
                                                 example.PRESETS, argv=a), argv)


def run_script(*args: str, mnist: Path | None, timeout: float = 600, env: dict | None = None, cwd=None,
               python_args: tuple[str, ...] = ()):
    """Run examples/train_mnist.py as a real subprocess (``python_args`` before the script's path,
    e.g. ``("-c", program)`` to start it from a program); returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MNIST_ROOT", None)
    cmd = [sys.executable, *python_args, str(SCRIPT), *args]
    if mnist is not None:
        cmd += ["--data-dir", str(mnist)]
    return forkserver.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
