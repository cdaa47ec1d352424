"""Where users install it: every module imports on a system without ``fcntl`` (Windows), the run lock
says what it does there, and a run's files get the permissions the user's umask gives."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.test_install import IMPORT_ALL, PACKAGES
from tests.test_run import regress

WITHOUT = """\
import sys
for name in {hidden!r}:
    sys.modules[name] = None  # an import of it raises ImportError, as on a system that lacks it
"""
LOCK_WITHOUT_EITHER = """\
import json, sys, tempfile, warnings
from engine import RunLock
folder = tempfile.mkdtemp()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with RunLock(folder), RunLock(folder):  # nothing to lock with: both go ahead, each saying so
        pass
print(json.dumps([str(w.message) for w in caught]))
"""


def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)


def test_every_module_imports_without_fcntl():
    proc = _python(WITHOUT.format(hidden=["fcntl"]) + IMPORT_ALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = set(json.loads(proc.stdout.splitlines()[-1])["names"])
    expected = {".".join(p.relative_to(ROOT).with_suffix("").parts) for package in PACKAGES
                for p in (ROOT / package).rglob("*.py") if p.stem not in ("__init__", "__main__")}
    assert expected <= names, sorted(expected - names)


def test_without_any_lock_call_a_run_is_unlocked_and_says_so():
    proc = _python(WITHOUT.format(hidden=["fcntl", "msvcrt"]) + LOCK_WITHOUT_EITHER)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = json.loads(proc.stdout.splitlines()[-1])
    assert len(said) == 2 and all("neither fcntl nor msvcrt" in line and "not locked" in line for line in said)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_a_runs_files_get_the_permissions_of_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        result, _ = regress(tmp_path, epochs=1)
    finally:
        os.umask(before)
    assert result.exit_code == 0
    out = tmp_path / "run"
    files = [out / "config.json", out / "history.json", *(out / "checkpoints").glob("*.pt"), *(out / "tb").rglob("*")]
    files = [f for f in files if f.is_file()]
    assert len([f for f in files if f.suffix == ".pt"]) >= 2 and any("tfevents" in f.name for f in files)
    modes = {str(f.relative_to(out)): oct(stat.S_IMODE(f.stat().st_mode)) for f in files}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
