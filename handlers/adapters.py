"""Every place where we rely on a private attribute of Ignite, tensorboardX, PyTorch's DataLoader or torchdata's
StatefulDataLoader, and only here.

``tests/test_adapters.py`` exercises each function against the installed versions, so a release
that renames one of these attributes fails that test loudly instead of breaking a run quietly.
"""

from __future__ import annotations

import io
import os
import queue
import time
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

__all__ = ["add_hparams_fast", "add_image_fast", "add_scalars_fast", "checkpoint_items", "exception_handler_count",
           "flush_tensorboardx", "inductor_default_cache", "load_engine_state", "move_metric_state",
           "queue_in_thread", "release_workers", "set_checkpoint_items", "skip_unused_triton_key", "stream_progress",
           "waiting_on_worker"]


def checkpoint_items(checkpoint: Checkpoint) -> list[Any]:
    """The files an Ignite ``Checkpoint`` keeps (``Checkpoint.Item(priority, filename)``), oldest or worst first,
    read through its public ``state_dict()`` (whose one key names the private list it copies)."""
    (saved,) = checkpoint.state_dict().values()
    return [Checkpoint.Item(priority, filename) for priority, filename in saved]


def set_checkpoint_items(checkpoint: Checkpoint, items: list[Any]) -> None:
    """Replace that list (after a resume, without the files that are gone), through ``load_state_dict()``."""
    (key,) = checkpoint.state_dict().keys()
    checkpoint.load_state_dict({key: [(priority, filename) for priority, filename in items]})


def inductor_default_cache() -> str:
    """The folder Inductor keeps its caches in when ``TORCHINDUCTOR_CACHE_DIR`` is not set (torch writes
    it into that variable as soon as anything asks: importing torchvision does)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir())


def skip_unused_triton_key() -> bool:
    """On a machine without CUDA, Inductor's ``CacheBase.get_system()`` still hashes Triton's files (~0.3 s a
    process) for a version it then leaves out: without a device its system key is the hash of ``{}``. There,
    ``triton_key`` is made to return ``None`` before anything asks (the keys stay the same: tested); whether
    it was."""
    import torch._inductor.codecache as codecache

    if torch.cuda.is_available() or getattr(codecache.triton_key, "skipped", False):
        return False

    def triton_key() -> None:
        return None

    triton_key.skipped = True  # type: ignore[attr-defined]
    codecache.triton_key = triton_key
    return True


def load_engine_state(engine: Engine, state: Mapping[str, Any]) -> None:
    """``engine.load_state_dict(state)``, also for a state saved during a stream's first pass (its
    ``epoch_length`` still unknown, ``None``): Ignite 0.5.5 refuses that one before reaching its own code
    for it (epoch 0, the iteration as saved), so it is loaded at iteration 0 and then set as that code does."""
    iteration = state.get("iteration")
    if state.get("epoch_length") is None and "epoch" not in state and iteration:
        engine.load_state_dict({**state, "iteration": 0})
        engine.state.iteration, engine.state.epoch = int(iteration), 0
        return
    engine.load_state_dict(state)


def move_metric_state(metric: Any, device: torch.device) -> None:
    """An Ignite metric's tensors of state (``_state_dict_all_req_keys``) onto ``device``: after
    ``load_state_dict`` they are where the file was read to, not where the metric adds into them."""
    for name in getattr(metric, "_state_dict_all_req_keys", ()):
        value = getattr(metric, name, None)
        if isinstance(value, torch.Tensor) and value.device != device:
            setattr(metric, name, value.to(device))


def exception_handler_count(engine: Engine) -> int:
    """How many handlers ``engine`` has for ``EXCEPTION_RAISED`` (with any, Ignite no longer re-raises)."""
    return len(engine._event_handlers.get(Events.EXCEPTION_RAISED, []))


def flush_tensorboardx(writer: Any) -> None:
    """Get every event a tensorboardX ``SummaryWriter`` has queued into its file now.

    tensorboardX queues events for a writer thread, and its ``flush()`` flushes only what that
    thread has already written: a run killed right after would lose the rest. So the thread is
    stopped (it writes the whole queue first, in order), the file flushed, and a new thread started
    on the same file. A writer without these internals gets its own ``flush()``.
    """
    events = getattr(writer._get_file_writer(), "event_writer", None)
    worker = getattr(events, "_worker", None)
    if worker is None or not hasattr(worker, "stop") or events._closed:
        writer.flush()
        return
    worker.stop()
    events._ev_writer.flush()
    events._worker = type(worker)(events._event_queue, events._ev_writer, events._flush_secs)
    events._worker.start()


class _ThreadQueue(queue.Queue):
    """``queue.Queue`` with the ``close()`` that tensorboardX calls on its queue at the end."""

    def close(self) -> None:
        pass


def queue_in_thread(writer: Any) -> bool:
    """Hand a tensorboardX ``SummaryWriter``'s events to its writer thread through a ``queue.Queue``
    instead of the ``multiprocessing.Queue`` it makes, which pickles every event and feeds a pipe
    from one more thread (a put: 60-70 us against 25-30, measured here), for a thread of the same
    process. Whether it was done (a writer without these internals is left as it is)."""
    events = getattr(writer._get_file_writer(), "event_writer", None)
    worker = getattr(events, "_worker", None)
    if worker is None or not hasattr(worker, "stop") or events._closed:
        return False
    worker.stop()  # it writes what is queued first
    old, events._event_queue = events._event_queue, _ThreadQueue(getattr(events._event_queue, "_maxsize", 10))
    if hasattr(old, "join_thread"):  # the multiprocessing queue's feeder thread ends with it
        old.close()
        old.join_thread()
    events._worker = type(worker)(events._event_queue, events._ev_writer, events._flush_secs)
    events._worker.start()
    return True


def add_scalars_fast(writer: Any, values: Mapping[str, float], step: int) -> None:
    """``writer.add_scalar(tag, value, step)`` for each item, as one event: the same records in
    TensorBoard (one ``simple_value`` per tag at ``step``), without tensorboardX's conversion of each
    value through numpy and one event, queue hand-over and checksum per value."""
    if not values:
        return
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import _clean_tag  # the tag as add_scalar writes it

    summary = Summary(value=[Summary.Value(tag=_clean_tag(tag), simple_value=float(v)) for tag, v in values.items()])
    writer._get_file_writer().add_summary(summary, step)


def add_hparams_fast(writer: Any, hparams: Mapping[str, Any], metrics: Mapping[str, float], name: str) -> None:
    """``writer.add_hparams(hparams, metrics, name=name)``: the same records in the same sub-run
    (``<logdir>/<name>``), written and closed here, without the second ``SummaryWriter`` (its queue
    and writer thread, started and stopped) that tensorboardX makes for them."""
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto import event_pb2
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import _clean_tag
    from tensorboardX.summary import hparams as hparams_summaries

    summaries = list(hparams_summaries(dict(hparams), dict(metrics)))
    summaries += [Summary(value=[Summary.Value(tag=_clean_tag(k), simple_value=float(v))]) for k, v in metrics.items()]
    logdir = os.path.join(writer._get_file_writer().get_logdir(), name)
    os.makedirs(logdir, exist_ok=True)
    events = EventsWriter(os.path.join(logdir, "events"))
    try:
        for summary in summaries:
            events.write_event(event_pb2.Event(summary=summary, wall_time=time.time()))
    finally:
        events.close()


def add_image_fast(writer: Any, tag: str, image: torch.Tensor, step: int) -> None:
    """``writer.add_image(tag, image, step)`` for a (3, H, W) uint8 image, at a fraction of the cost:
    tensorboardX resamples the image to its own size (LANCZOS) and encodes the PNG at the default
    level; here it is encoded once, at PNG level 1 (lossless all the same), into the same record."""
    from PIL import Image
    from tensorboardX.proto.summary_pb2 import Summary

    pixels = image.permute(1, 2, 0).contiguous().cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    height, width, channels = pixels.shape
    record = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=buffer.getvalue())
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=record)]), step)


def release_workers(loader: Any) -> bool:
    """Stop the persistent workers of a ``DataLoader`` (or of the loader inside a stream's
    ``StreamLoader``) now; whether there were any. Left alive after a run, they are inherited by the
    workers the next ``DataLoader`` forks, which then fail in their garbage collection with
    'can only test a child process' tracebacks (two ``fit`` calls in one process)."""
    loader = getattr(loader, "loader", loader)
    iterator = getattr(loader, "_iterator", None)
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return False
    iterator._shutdown_workers()
    loader._iterator = None
    return True


def stream_progress(loader_state: Mapping[str, Any]) -> tuple[int, bool]:
    """From a ``StatefulDataLoader.state_dict()``: batches handed out in the current pass, and whether
    that pass had ended."""
    return int(loader_state.get("_num_yielded") or 0), bool(loader_state.get("_iterator_finished"))


def waiting_on_worker(engine: Engine) -> tuple[int, int | None] | None:
    """The DataLoader worker ``engine`` waits on for its next batch: ``(worker id, pid)``; ``None`` where the
    loader has no workers. Reads Ignite's ``_dataloader_iter`` and the multiprocessing iterator's
    ``_rcvd_idx``/``_task_info``/``_workers`` (PyTorch's, and torchdata's ``StatefulDataLoader``'s), through
    a stream's or a loader's wrapper (``_iterator``, a generator's locals)."""
    iterator = _worker_iterator(getattr(engine, "_dataloader_iter", None), depth=4)
    if iterator is None:
        return None
    info = iterator._task_info.get(iterator._rcvd_idx)
    if not info:
        return None
    worker = int(info[0])
    workers = getattr(iterator, "_workers", [])
    return worker, (workers[worker].pid if worker < len(workers) else None)


def _worker_iterator(value: Any, depth: int) -> Any:
    """The multiprocessing DataLoader iterator held by ``value`` (itself, an attribute, a generator's local)."""
    if value is None or depth < 0:
        return None
    if hasattr(value, "_task_info") and hasattr(value, "_rcvd_idx"):
        return value
    held = [getattr(value, name, None) for name in ("_iterator", "iterator", "_it", "loader")]
    frame = getattr(value, "gi_frame", None)
    if frame is not None:
        held += list(frame.f_locals.values())
    for candidate in held:
        if candidate is not None and candidate is not value:
            found = _worker_iterator(candidate, depth - 1)
            if found is not None:
                return found
    return None
