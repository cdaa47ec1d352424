"""The suite's own scheduling data still names real tests."""

from __future__ import annotations

import re

from tests.conftest import LONGEST, ROOT, SHARED_RUNS


def test_each_longest_name_starts_a_test_and_each_shared_run_is_a_fixture():
    source = "\n".join(p.read_text() for p in sorted((ROOT / "tests").glob("test_*.py")))
    tests = re.findall(r"^def (test_\w+)\(", source, flags=re.M)
    assert all(any(t.startswith(name) for t in tests) for name in LONGEST), LONGEST
    fixtures = set(re.findall(r"^@pytest\.fixture\([^)]*\)\ndef (\w+)\(", source, flags=re.M))
    assert set(SHARED_RUNS) <= fixtures, set(SHARED_RUNS) - fixtures
