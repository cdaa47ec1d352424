"""An output folder that cannot be made or written, for real: under a file, without permission, on a read-only
file system. One line naming --output-dir, exit 2, before any training (nothing else made)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.user_program import __file__ as PROGRAM

pytestmark = pytest.mark.slow
ARGS = ["--kind", "fast", "--epochs", "1"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def under_a_file(tmp_path) -> tuple[list[str], str]:
    (tmp_path / "notes.txt").write_text("a file")
    out = tmp_path / "notes.txt" / "run"
    return [str(out)], f"{out} cannot be made or written: {tmp_path / 'notes.txt'} is a file, not a folder"


def without_permission(tmp_path) -> tuple[list[str], str]:
    locked = tmp_path / "locked"
    locked.mkdir()
    out = locked / "run"
    if os.geteuid() != 0:
        locked.chmod(0o500)  # readable, not writable
        return [str(out)], f"{out} cannot be made or written: permission denied"
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: no user here to be refused")
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*as_nobody, sys.executable, "-c", f"open({PROGRAM!r}).close()"], capture_output=True)
    if probe.returncode != 0:  # a checkout inside a folder only root may enter (/root, mktemp -d)
        pytest.skip("nobody cannot reach the interpreter or the program here (a checkout in a root-only folder)")
    locked.chmod(0o700)  # root's own: the program runs as nobody
    return [*as_nobody, str(out)], \
        f"{out} cannot be read: permission denied"  # fmt: skip


def read_only(tmp_path) -> tuple[list[str], str]:
    mounted = tmp_path / "ro"
    mounted.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {mounted}"],
                           capture_output=True) if shutil.which("unshare") else None  # fmt: skip
    if probe is None or probe.returncode != 0:
        pytest.skip("no user namespace here to mount a read-only file system in (unshare -rm)")
    out = mounted / "run"
    return ["unshare", "-rm", "sh", "-c", f'mount -t tmpfs -o ro tmpfs {mounted} && exec "$@"', "sh", str(out)], \
        f"{out} cannot be made or written: its file system is read-only"  # fmt: skip


@pytest.mark.parametrize("case", [under_a_file, without_permission, read_only])
def test_an_output_folder_that_cannot_be_made_or_written_is_one_line_and_exit_2(tmp_path, case):
    wrap, message = case(tmp_path)
    out = wrap.pop()
    proc = run([*wrap, sys.executable, PROGRAM, *ARGS, "--output-dir", out])
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: --output-dir {message}; choose another --output-dir"]
    assert proc.stdout == ""  # nothing ran
