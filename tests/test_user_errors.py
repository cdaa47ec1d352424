"""The filtering of tracebacks for a bug in the user's code: which files are theirs, a DataLoader worker's
traceback text, the one line after it."""

from __future__ import annotations

import torch

from handlers import user_errors
from handlers.user_errors import describe_failure, is_library_file, user_traceback

WORKER_TEXT = '''Caught KeyError in DataLoader worker process 1.
Original Traceback (most recent call last):
  File "%s", line 375, in _worker_loop
    data = fetcher.fetch(index)
           ^^^^^^^^^^^^^^^^^^^^
  File "/home/me/project/data.py", line 16, in __getitem__
    raise KeyError(f"sample {i} is missing")
    ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
KeyError: 'sample 40 is missing'
''' % torch.utils.data.__file__  # noqa: UP031 (the text holds an f-string's braces)


def test_library_files_are_pythons_installed_packages_and_ours():
    assert is_library_file(torch.__file__) and is_library_file(user_errors.__file__)
    assert is_library_file("<frozen importlib._bootstrap>")
    assert not is_library_file("/home/me/project/train.py") and not is_library_file("<string>")


def test_a_workers_traceback_is_cut_to_the_users_frames_without_carets():
    exc = KeyError(WORKER_TEXT)
    assert user_traceback(exc)[1:] == ['  File "/home/me/project/data.py", line 16, in __getitem__',
                                       '    raise KeyError(f"sample {i} is missing")']
    exc.run_where = "epoch 1, iteration 3"
    assert describe_failure(exc) == ("KeyError: 'sample 40 is missing' (in a DataLoader worker, epoch 1, iteration 3; "
                                     "checkpoints already saved are intact)")


def test_without_a_frame_of_the_users_the_line_says_how_to_see_where(monkeypatch):
    monkeypatch.delenv(user_errors.FULL_TRACEBACK_ENV, raising=False)
    try:
        torch.zeros(2).view(3)  # raised inside torch, called from here: this file is the user's
    except RuntimeError as exc:
        assert user_traceback(exc) and not describe_failure(exc).endswith("shows where)")
        exc.__traceback__ = None  # as if only library frames were there
        assert describe_failure(exc).endswith(f"intact; {user_errors.FULL_TRACEBACK_ENV}=1 shows where)")
