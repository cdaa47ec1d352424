"""Importing our packages brings torch and Ignite in without the collector's full collections, and
leaves the collector as it found it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests import forkserver

FULL_COLLECTIONS = """\
import gc, json, sys
before = gc.get_stats()[2]["collections"]
import engine, handlers
print(json.dumps({"full": gc.get_stats()[2]["collections"] - before, "frozen": gc.get_freeze_count(),
                  "enabled": gc.isenabled(), "torch": "torch" in sys.modules,
                  "ignite": "ignite.engine" in sys.modules}))
"""

AFTER = """\
import gc, json, sys
if sys.argv[1] == "off":
    gc.disable()
import engine, handlers
class Node:
    pass
a, b = Node(), Node()
a.other, b.other = b, a  # a reference cycle made after the import: garbage the collector must still find
del a, b
print(json.dumps({"enabled": gc.isenabled(), "collected": gc.collect()}))
"""


def test_a_fresh_interpreter_imports_torch_and_ignite_through_ours_without_a_full_collection():
    # a fresh interpreter, not a forked child: the fork server has imported torch already
    out = subprocess.run([sys.executable, "-c", FULL_COLLECTIONS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["torch"] and seen["ignite"] and seen["enabled"]
    assert seen["full"] == 0  # without the pause: three during torch's import, a fourth in Ignite's (0.3 s here)
    assert seen["frozen"] > 100_000  # torch's and Ignite's objects: left out of every later collection


def test_the_collector_is_left_as_found_and_still_collects_new_cycles():
    for state, enabled in (("on", True), ("off", False)):
        out = forkserver.run([sys.executable, "-c", AFTER, state], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == {"enabled": enabled, "collected": 2}
