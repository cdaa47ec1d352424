"""The fork server the tests start their processes from behaves as a fresh ``python`` would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests import forkserver

PROBE = """\
import json, os, sys
import numpy
print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "env": os.environ.get("PROBE"),
                  "main": __name__, "pid": os.getpid(), "numpy": int(numpy.random.randint(1 << 30))}))
print("to stderr", file=sys.stderr)
"""

pytestmark = pytest.mark.skipif(not forkserver.forkable([sys.executable, "x.py"], None),
                                reason="the fork server is off (TESTS_FORKSERVER=0)")


@pytest.fixture
def probe(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    return script


@pytest.mark.parametrize("how", [["SCRIPT"], ["-c", "CODE"]])
def test_a_forked_child_sees_what_a_fresh_interpreter_sees(probe, tmp_path, how):
    cmd = [sys.executable, *[str(probe) if a == "SCRIPT" else PROBE if a == "CODE" else a for a in how], "one", "2"]
    env = {**os.environ, "PROBE": "yes"}
    forked = forkserver.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    fresh = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert (forked.returncode, forked.stderr) == (fresh.returncode, fresh.stderr) == (0, "to stderr\n")
    a, b = json.loads(forked.stdout), json.loads(fresh.stdout)
    assert a["pid"] != os.getpid() and a["numpy"] != b["numpy"]
    del a["pid"], b["pid"], a["numpy"], b["numpy"]
    assert a == b


@pytest.mark.parametrize("body, code", [
    ("import sys; sys.exit(3)", 3),
    ("import sys; sys.exit('a message')", 1),
    ("def f():\n    raise KeyError(3)\nf()", 1),
    ("raise KeyboardInterrupt", -signal.SIGINT),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", -signal.SIGTERM),
])
def test_exit_status_and_traceback_are_a_fresh_interpreters(tmp_path, body, code):
    script = tmp_path / "ends.py"
    script.write_text(body + "\n")
    forked = forkserver.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    fresh = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert forked.returncode == fresh.returncode == code
    assert forked.stderr == fresh.stderr  # the traceback starts at the script's own frame


def test_a_child_is_killed_by_a_real_signal_and_its_output_read_as_it_comes(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")
    proc = forkserver.popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert isinstance(proc, forkserver.ForkedProcess)
    assert proc.stdout.readline() == "started\n" and proc.poll() is None
    assert os.getpgid(proc.pid) == proc.pid  # a session of its own
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    proc.stdout.close()


def test_another_import_time_environment_gets_a_fresh_interpreter():
    cmd = [sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    threads = 1 if os.environ.get("OMP_NUM_THREADS") != "1" else 2  # not what the server's torch was built with
    proc = forkserver.popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    assert isinstance(proc, subprocess.Popen)
    assert proc.communicate(timeout=120)[0] == f"{threads}\n"
