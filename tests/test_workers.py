"""A forked DataLoader worker stays quiet when its run is killed under it: the resource sharer's connection
error is dropped once the parent is gone, and only then; every other error reaches the usual hook."""

from __future__ import annotations

import multiprocessing.resource_sharer

import pytest

from engine import workers


def raised_in(filename: str, error: BaseException):
    """An exception and its traceback as if raised in ``filename``."""
    namespace: dict = {}
    exec(compile("def serve(error):\n    raise error\n", filename, "exec"), namespace)
    try:
        namespace["serve"](error)
    except BaseException as exc:  # the point: to hold it
        return type(exc), exc, exc.__traceback__


@pytest.mark.parametrize("parent_gone, where, error, said", [
    (True, multiprocessing.resource_sharer.__file__, ConnectionResetError(104, "reset"), False),
    (False, multiprocessing.resource_sharer.__file__, ConnectionResetError(104, "reset"), True),  # parent alive
    (True, "/home/me/data.py", ConnectionResetError(104, "reset"), True),  # not the sharer's thread
    (True, multiprocessing.resource_sharer.__file__, ValueError("a bug"), True),  # not a connection error
])  # fmt: skip
def test_only_the_sharers_connection_errors_after_the_parent_died_are_dropped(monkeypatch, parent_gone, where,
                                                                              error, said):
    seen = []
    monkeypatch.setitem(workers._parent, "hook", lambda *args: seen.append(args[1]))
    monkeypatch.setattr(workers, "_parent_gone", lambda wait=1.0: parent_gone)
    workers.quiet_when_orphaned(*raised_in(where, error))
    assert bool(seen) == said


def test_the_parent_is_gone_when_the_child_was_handed_to_another(monkeypatch):
    import os

    monkeypatch.setitem(workers._parent, "pid", os.getppid())
    assert not workers._parent_gone(wait=0.1)
    monkeypatch.setitem(workers._parent, "pid", -1)  # a parent that is not ours any more
    assert workers._parent_gone(wait=0.1)
