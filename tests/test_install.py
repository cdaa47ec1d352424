"""Installed the way users install it: the sdist and the wheel built from the checkout, and a wheel built
from that sdist, each installed into a fresh virtual environment and used from a folder outside the
checkout: every module imports, the README's ``my_train.py`` trains an epoch, its checkpoint verifies
with the documented command, and the run resumes.

The environment gets its dependencies from the ones ``make test`` installed (linked, not copied: a
second torch is ~5.6 GB and 90 s), without this checkout's editable install; ``pip check`` proves the
wheel's declared requirements are met there. The environment is removed when the test ends.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_examples import readme_program

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("install")]
PACKAGES = ("engine", "handlers")
NOT_SOURCE = (".git", ".venv", ".gpu", "build", "dist", "runs", "data", "__pycache__", ".pytest_cache", ".hypothesis",
              "*.egg-info", ".ruff_cache", "site")
IMPORT_ALL = """\
import importlib, json, pkgutil, sys
import engine, handlers
names = []
for package in (engine, handlers):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
            names.append(info.name)
print(json.dumps({"names": names, "files": [engine.__file__, handlers.__file__]}))
"""


def _build(*args: str, source: Path, out: Path) -> Path:
    """``python -m build`` without an isolated environment (offline: this interpreter's setuptools)."""
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", *args, "--outdir", str(out), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    kind = "*.whl" if "--wheel" in args else "*.tar.gz"
    (built,) = out.glob(kind)
    return built


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """The sdist, the wheel built from a copy of the checkout, and the wheel built from the sdist."""
    base = tmp_path_factory.mktemp("dists")
    source = base / "checkout"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE), symlinks=True)
    sdist = _build("--sdist", source=source, out=base / "sdist")
    wheel = _build("--wheel", source=source, out=base / "wheel")
    with tarfile.open(sdist) as tar:
        tar.extractall(base / "unpacked", filter="data")
    (unpacked,) = (base / "unpacked").iterdir()
    from_sdist = _build("--wheel", source=unpacked, out=base / "wheel-from-sdist")
    yield {"sdist": sdist, "checkout": wheel, "sdist-wheel": from_sdist}
    shutil.rmtree(base, ignore_errors=True)


def _site_packages(env: Path) -> Path:
    (site,) = env.glob("lib/python*/site-packages") or env.glob("Lib/site-packages")
    return site


def _fresh_env(folder: Path) -> Path:
    """A new virtual environment whose site-packages links to every distribution this one has, except ours."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    site, ours = _site_packages(folder), Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        name = entry.name.lower()
        if name.startswith(("ignite_trainer", "__editable__", "engine", "handlers")) or name == "__pycache__":
            continue
        (site / entry.name).symlink_to(entry)
    return folder / ("Scripts" if os.name == "nt" else "bin") / "python"


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(python), *args, "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=300, env=_clean_env())  # no checkout on its path


def test_the_sdist_carries_the_tests_examples_readme_and_licence(dists):
    with tarfile.open(dists["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for wanted in ("README.md", "LICENSE", "pyproject.toml", "examples/train_mnist.py", "tests/conftest.py",
                   "tests/test_install.py", "engine/py.typed", "handlers/py.typed", "handlers/checkpoint/__main__.py"):
        assert wanted in names, wanted
    assert not any(name.endswith(".pyc") or name.startswith((".venv/", "runs/", "data/")) for name in names)


def test_both_wheels_carry_every_module_of_the_checkout_and_the_same_files(dists):
    wanted = {str(p.relative_to(ROOT)) for package in PACKAGES for p in (ROOT / package).rglob("*")
              if p.suffix in (".py", ".typed") and "__pycache__" not in p.parts}
    contents = {}
    for kind in ("checkout", "sdist-wheel"):
        with zipfile.ZipFile(dists[kind]) as whl:
            contents[kind] = {n: whl.read(n) for n in whl.namelist() if not n.endswith("/RECORD")}
        assert wanted <= set(contents[kind]), sorted(wanted - set(contents[kind]))
        top = {n.split("/")[0] for n in contents[kind] if not n.startswith("ignite_trainer-")}
        assert top == set(PACKAGES)  # tests, examples and benchmarks are not importable packages of the wheel
        metadata = contents[kind]["ignite_trainer-0.1.0.dist-info/METADATA"].decode()
        for field in ("License-Expression: MIT", "Project-URL: Source", "Classifier: Typing :: Typed", "Keywords:"):
            assert field in metadata, field
    assert contents["checkout"] == contents["sdist-wheel"]


def test_the_checkout_wheel_installs_and_imports_every_module_away_from_the_checkout(dists, tmp_path):
    """The wheel built from the checkout: byte for byte the sdist's wheel (the test above), which the test
    below runs whole; here it is installed and imported on its own."""
    env_dir = tmp_path / "env"
    try:
        python = _fresh_env(env_dir)
        installed = _pip(python, "install", "--no-deps", "--no-index", str(dists["checkout"]))
        assert installed.returncode == 0, installed.stderr
        user = tmp_path / "user"
        user.mkdir()
        imported = subprocess.run([str(python), "-c", IMPORT_ALL], cwd=user, env=_clean_env(), capture_output=True,
                                  text=True, timeout=300)
        assert imported.returncode == 0, imported.stderr[-3000:]
        assert all(Path(f).is_relative_to(_site_packages(env_dir)) for f in json.loads(imported.stdout)["files"])
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    return {**env, "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("kind", ["sdist-wheel"])
def test_the_installed_wheel_trains_verifies_and_resumes_away_from_the_checkout(dists, kind, tmp_path):
    env_dir = tmp_path / "env"
    try:
        python = _fresh_env(env_dir)
        installed = _pip(python, "install", "--no-deps", "--no-index", str(dists[kind]))
        assert installed.returncode == 0, installed.stderr
        check = _pip(python, "check")  # the wheel's requirements, met by the linked distributions
        assert check.returncode == 0, check.stdout + check.stderr
        user = tmp_path / "user"  # outside the checkout: only the installed packages can be imported
        user.mkdir()
        env = _clean_env()

        def run(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([str(python), *args], cwd=user, env=env, capture_output=True, text=True, timeout=300)

        imported = run("-c", IMPORT_ALL)
        assert imported.returncode == 0, imported.stderr[-3000:]
        seen = json.loads(imported.stdout.splitlines()[-1])
        site = _site_packages(env_dir)
        assert all(Path(f).is_relative_to(site) for f in seen["files"]), seen["files"]
        expected = {".".join(p.relative_to(ROOT).with_suffix("").parts) for package in PACKAGES
                    for p in (ROOT / package).rglob("*.py") if p.stem not in ("__init__", "__main__")}
        assert expected <= set(seen["names"]), sorted(expected - set(seen["names"]))
        assert (site / "engine" / "py.typed").is_file() and (site / "handlers" / "py.typed").is_file()

        (user / "my_train.py").write_text(readme_program())
        first = run("my_train.py", "--output-dir", "runs/tiny", "--epochs", "1", "--no-progress")
        assert first.returncode == 0, first.stderr[-3000:]
        saved = sorted((user / "runs" / "tiny" / "checkpoints").glob("*.pt"))
        assert saved
        verified = run("-m", "handlers.checkpoint", "verify", *map(str, saved))
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert [line.split()[0] for line in verified.stdout.splitlines()] == ["OK"] * len(saved)
        resumed = run("my_train.py", "--output-dir", "runs/tiny", "--resume", "auto", "--epochs", "2", "--no-progress")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        rows = json.loads((user / "runs" / "tiny" / "history.json").read_text())
        assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val_accuracy"] > 0.5
    finally:
        shutil.rmtree(env_dir, ignore_errors=True)  # links only, but never left behind
