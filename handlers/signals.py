"""Stop on SIGINT (Ctrl-C), SIGTERM (a scheduler's preemption, ``kill``) or SIGHUP (a closed terminal, a
dropped ssh session) with a checkpoint of the current iteration."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from engine import distributed
from engine.errors import param
from handlers.adapters import exception_handler_count
from handlers.checkpoint import TrainingCheckpoint
from handlers.console import flush_output

__all__ = ["STOP_SIGNALS", "GracefulStop", "LastLines", "StopSignal"]

# the signals that stop a run with a checkpoint (SIGHUP where the system has it: not on Windows)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_MID_ITERATION = (Events.GET_BATCH_STARTED, Events.GET_BATCH_COMPLETED, Events.ITERATION_STARTED)


class GracefulStop:
    """On the first SIGTERM, SIGINT or SIGHUP: finish the running iteration, save ``last`` there, stop the run.

    ``exit_code`` is then ``128 + signal`` (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP). The handlers are
    installed when the trainer starts and stay until the run has printed its last line (:meth:`uninstall`,
    called by the run, also when it ends by an exception, which still propagates). Every signal is
    answered by a true line, by where the run is (:attr:`phase`):

    - ``training``: the first stops the run after this iteration, with a checkpoint;
    - ``stopping`` (that iteration and its save): a second waits for the save (every file is complete
      or absent: saves are atomic renames); a third quits at once, naming the newest complete checkpoint;
    - ``finishing`` (training is over; the history and the summary are being written): nothing is cut
      short; the exit code says a signal came.

    In a distributed run the ranks agree after every iteration (one tiny all-reduce) and all stop
    at the same iteration, whichever of them received the signal; rank 0 writes the checkpoint.
    """

    def __init__(
        self,
        checkpoint: TrainingCheckpoint | None,
        log: Callable[[str], None] = print,
        signals: tuple[int, ...] = STOP_SIGNALS,
    ) -> None:
        self.checkpoint = checkpoint
        self.log = log
        self.signals = signals
        self.received: int | None = None
        self.count = 0  # signals received
        self.phase = "idle"
        self._trainer: Engine | None = None
        self._previous: dict[int, object] = {}

    @property
    def exit_code(self) -> int | None:
        return None if self.received is None else 128 + self.received

    def attach(self, trainer: Engine) -> GracefulStop:
        self._trainer = trainer
        trainer.add_event_handler(Events.STARTED, self.install)
        trainer.add_event_handler(Events.TERMINATE, self._save)
        trainer.add_event_handler(Events.COMPLETED, self._finishing)
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
            self.phase = "stopping"
            self._announce(self.received)  # once every rank is known to be there to stop with us
            engine.terminate()

    def _finishing(self, engine: Engine) -> None:
        self.phase = "finishing"

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
        self.phase = "training" if self.received is None else self.phase
        _state["run"] = self
        if self._previous:
            return
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self, engine: Engine | None = None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if _state.get("run") is self:  # what a signal that comes later, up to the process's exit, is told
            _state.update(run=None, ended=self)

    def _kept(self) -> str:
        path = self.checkpoint.last_path if self.checkpoint is not None else None
        return f"{path} is kept" if path is not None else "no checkpoint of this run was complete"

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.phase == "finishing":
            if self.received is None:
                self.received = signum
            self.log(f"Received {name} as the run finishes: its checkpoints are written; finishing its last lines")
            return
        if self.received is not None:  # stopping: the iteration and its save are under way
            if self.count >= 3:
                self.log(f"Received {name} a third time: quitting at once; {self._kept()} (the file being written, "
                         f"if any, is left out)")
                flush_output()
                os._exit(128 + self.received)
            self.log(f"Received {name} again: the run stops once its checkpoint is written (send it a third time to "
                     f"quit at once; {self._kept()})")
            return
        self.received = signum
        self.phase = "stopping"
        if self._trainer is not None and idist.get_world_size() == 1:  # distributed: all stop together in _agree
            self._announce(signum)
            # Between fetching a batch and the end of its iteration, Ignite would stop at its next check:
            # the batch drawn from the loader (whose position the checkpoint saves) but not trained on,
            # or the iteration counted before its step. There, _end stops when the iteration ends instead.
            if self._trainer.last_event_name not in _MID_ITERATION:
                self._trainer.terminate()

    def _announce(self, signum: int) -> None:
        self.log(f"Received {signal.Signals(signum).name}: stopping after this iteration and saving a checkpoint "
                 f"(a second signal waits for it; a third quits at once)")

    def _save(self, engine: Engine) -> None:
        if self.received is None or self.checkpoint is None:
            return
        if not self.checkpoint.saved_at(engine.state.iteration):
            self.checkpoint.save(engine, best=False)  # Ignite's Checkpoint writes on rank 0 only
        path = self.checkpoint.last_path
        self.log(f"Saved {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}; "
                 f"continue with {param('resume', 'auto')}")
        self.phase = "finishing"


_state: dict[str, GracefulStop | None] = {"run": None, "ended": None}  # this process's run, and the last one


class StopSignal(KeyboardInterrupt):
    """A stop signal before any run of this process had started (nothing of it to save)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class LastLines:
    """The command line's handlers for the stop signals (SIGINT, SIGTERM, SIGHUP), from its start to the
    process's exit, around the runs (each run's :class:`GracefulStop` takes over while it runs). Before any
    run has started, a signal interrupts (a :class:`StopSignal`: nothing was saved); after a run has ended, it is
    recorded and answered by one true line, and :attr:`received` gives the exit code; nothing raises."""

    def __init__(self, log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)) -> None:
        self.log = log
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> LastLines:
        _state.update(run=None, ended=None)
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        ended = _state.get("ended")
        if ended is None:
            raise StopSignal(signum)
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
        kept = ended.checkpoint.last_path if ended.checkpoint is not None else None
        self.log(f"Received {name} after the run had ended: its files are complete"
                 + (f" (newest checkpoint: {kept})" if kept is not None else "") + "; exiting")
