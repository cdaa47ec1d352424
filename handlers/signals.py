"""Stop on SIGTERM or SIGINT (Ctrl-C) with a checkpoint of the current iteration."""

from __future__ import annotations

import os
import signal
from typing import Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from engine import distributed
from engine.errors import param
from handlers.adapters import exception_handler_count
from handlers.checkpoint import TrainingCheckpoint

__all__ = ["GracefulStop"]

_MID_ITERATION = (Events.GET_BATCH_STARTED, Events.GET_BATCH_COMPLETED, Events.ITERATION_STARTED)


class GracefulStop:
    """On the first SIGTERM or SIGINT: finish the running iteration, save ``last`` there, stop the run.

    ``exit_code`` is then ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second signal while
    stopping exits at once: every file already saved stays valid, since saves are atomic renames.
    The handlers are installed when the trainer starts and the previous ones put back when the run
    ends, however it ends: completed, terminated or by an exception (which still
    propagates to the caller of ``trainer.run``).

    In a distributed run the ranks agree after every iteration (one tiny all-reduce) and all stop
    at the same iteration, whichever of them received the signal; rank 0 writes the checkpoint.
    """

    def __init__(
        self,
        checkpoint: TrainingCheckpoint | None,
        log: Callable[[str], None] = print,
        signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        self.checkpoint = checkpoint
        self.log = log
        self.signals = signals
        self.received: int | None = None
        self._trainer: Engine | None = None
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int | None:
        return None if self.received is None else 128 + self.received

    def attach(self, trainer: Engine) -> "GracefulStop":
        self._trainer = trainer
        trainer.add_event_handler(Events.STARTED, self.install)
        trainer.add_event_handler(Events.TERMINATE, self._save)
        trainer.add_event_handler(Events.COMPLETED, self.uninstall)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._on_exception)
        # where a signal that came mid-iteration stops the run: alone, at the iteration's end (see _handle);
        # distributed, there too, once the ranks have agreed
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._agree if idist.get_world_size() > 1 else self._end)
        return self

    def _end(self, engine: Engine) -> None:
        if self.received is not None and not engine.should_terminate:
            engine.terminate()

    def _agree(self, engine: Engine) -> None:
        flag = idist.all_reduce(torch.tensor([float(self.received or 0)]), op="MAX")
        if flag.item() > 0 and not engine.should_terminate:
            self.received = int(flag.item())
            self._announce(self.received)  # once every rank is known to be there to stop with us
            engine.terminate()

    def _on_exception(self, engine: Engine, exc: BaseException) -> None:
        if idist.get_world_size() > 1 and distributed.is_peer_failure(exc):
            # another process died: this one leaves with one line (the caller's), and the launcher's
            # SIGTERM, which follows at once, must not cut that line off
            for sig in self.signals:
                signal.signal(sig, signal.SIG_IGN)
            self._previous.clear()
        else:
            self.uninstall()
        if exception_handler_count(engine) == 1:  # ours alone: Ignite would have raised it, so do that
            raise exc

    def install(self, engine: Engine | None = None) -> None:
        if self._previous:
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self, engine: Engine | None = None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            os._exit(128 + signum)  # second signal: leave now; saved files are complete or absent
        self.received = signum
        if self._trainer is not None and idist.get_world_size() == 1:  # distributed: all stop together in _agree
            self._announce(signum)
            # Between fetching a batch and the end of its iteration, Ignite would stop at its next check:
            # the batch drawn from the loader (whose position the checkpoint saves) but not trained on,
            # or the iteration counted before its step. There, _end stops when the iteration ends instead.
            if self._trainer.last_event_name not in _MID_ITERATION:
                self._trainer.terminate()

    def _announce(self, signum: int) -> None:
        self.log(f"Received {signal.Signals(signum).name}: stopping after this iteration and saving a checkpoint "
                 f"(send it again to quit at once)")

    def _save(self, engine: Engine) -> None:
        if self.received is None or self.checkpoint is None:
            return
        self.checkpoint.save(engine, best=False)  # Ignite's Checkpoint writes on rank 0 only
        path = self.checkpoint.last_path
        self.log(f"Saved {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; "
                 f"continue with {param('resume', 'auto')}")
