"""Each private attribute of Ignite or tensorboardX that we use, against the installed versions:
a release that renames one fails here, loudly, instead of breaking runs quietly."""

from __future__ import annotations

import pytest
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboardX import SummaryWriter
from torch import nn

from handlers.adapters import checkpoint_items, exception_handler_count, flush_tensorboardx, set_checkpoint_items


def test_checkpoint_items_are_ignites_saved_files(tmp_path):
    trainer = Engine(lambda e, b: None)
    ckpt = Checkpoint({"model": nn.Linear(2, 2)}, str(tmp_path), n_saved=2)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, ckpt)
    trainer.run([0], max_epochs=3)
    items = checkpoint_items(ckpt)
    assert [i.filename for i in items] == ["model_2.pt", "model_3.pt"]
    assert str(ckpt.last_checkpoint).endswith(items[-1].filename)
    set_checkpoint_items(ckpt, [(items[0].priority, items[0].filename)])
    assert str(ckpt.last_checkpoint).endswith("model_2.pt")


def test_exception_handler_count_follows_add_event_handler():
    engine = Engine(lambda e, b: None)
    assert exception_handler_count(engine) == 0
    engine.add_event_handler(Events.EXCEPTION_RAISED, lambda e, exc: None)
    assert exception_handler_count(engine) == 1


def test_flush_gets_queued_events_into_the_file_with_the_writer_open(tmp_path):
    writer = SummaryWriter(str(tmp_path), flush_secs=600, max_queue=1000)
    events = writer._get_file_writer().event_writer
    assert hasattr(events._worker, "stop") and not events._closed  # the internals flush_tensorboardx uses
    try:
        for step in range(5):
            writer.add_scalar("x", float(step), step)
        flush_tensorboardx(writer)
        acc = EventAccumulator(str(tmp_path))
        acc.Reload()
        assert [e.step for e in acc.Scalars("x")] == list(range(5))
        writer.add_scalar("x", 5.0, 5)  # the restarted thread still writes
        flush_tensorboardx(writer)
        acc.Reload()
        assert [e.step for e in acc.Scalars("x")] == list(range(6))
    finally:
        writer.close()


def test_tensorboardx_checksums_records_in_c():
    from tensorboardX import crc32c

    assert crc32c._crc32c_native is not None  # the crc32c package is installed and tensorboardX found it
    assert crc32c.crc32c(b"123456789") == crc32c._crc32c(b"123456789") == 0xE3069283  # CRC-32C's check value


@pytest.mark.parametrize("in_thread", [False, True])
def test_fast_scalars_read_back_as_add_scalar_writes_them(tmp_path, in_thread):
    from handlers.adapters import add_scalars_fast, queue_in_thread

    writer = SummaryWriter(str(tmp_path / "fast"), max_queue=3)
    if in_thread:
        assert queue_in_thread(writer)
        assert type(writer._get_file_writer().event_writer._event_queue).__module__ == "handlers.adapters"
    slow = SummaryWriter(str(tmp_path / "slow"))
    values = {"loss/train_step": 0.25, "lr": 1e-3, "bad tag!": float("nan")}
    try:
        for step in range(1, 9):  # more events than the queue holds: the writer thread keeps up
            add_scalars_fast(writer, {tag: v * step for tag, v in values.items()}, step)
            for tag, v in values.items():
                slow.add_scalar(tag, v * step, step)
        flush_tensorboardx(writer)
        first = EventAccumulator(str(tmp_path / "fast"))
        first.Reload()
        assert [e.step for e in first.Scalars("lr")] == list(range(1, 9))  # in the file while the writer is open
    finally:
        writer.close()
        slow.close()
    read = []
    for name in ("fast", "slow"):
        acc = EventAccumulator(str(tmp_path / name))
        acc.Reload()
        read.append({tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]})
    assert set(read[0]) == {"loss/train_step", "lr", "bad_tag_"}
    assert str(read[0]) == str(read[1])  # the same tags, steps and float32 values (NaN included)


def test_fast_hparams_read_back_as_add_hparams_writes_them(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    from handlers.adapters import add_hparams_fast

    hparams, metrics = {"lr": 0.01, "model": "cnn", "amp": True, "epochs": 3}, {"hparam/best": 0.99, "hparam/epoch": 2}
    for name in ("fast", "slow"):
        writer = SummaryWriter(str(tmp_path / name))
        try:
            if name == "fast":
                add_hparams_fast(writer, hparams, metrics, name="hparams")
            else:
                writer.add_hparams(hparams, metrics, name="hparams")
        finally:
            writer.close()
    read = []
    for name in ("fast", "slow"):
        acc = EventAccumulator(str(tmp_path / name / "hparams"))
        acc.Reload()
        content = {tag: plugin_data_pb2.HParamsPluginData.FromString(v)
                   for tag, v in acc.PluginTagToContent("hparams").items()}
        scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        read.append((content, scalars))
    assert read[0] == read[1] and read[0][1]["hparam/best"][0][1] == pytest.approx(0.99)


def test_fast_images_read_back_as_tensorboardx_writes_them(tmp_path):
    import io

    import numpy as np
    import torch
    from PIL import Image

    from handlers.adapters import add_image_fast

    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    writer = SummaryWriter(str(tmp_path))
    try:
        add_image_fast(writer, "fast", image, 7)
        writer.add_image("slow", image, 7)
    finally:
        writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    fast, slow = acc.Images("fast")[0], acc.Images("slow")[0]
    assert (fast.step, fast.width, fast.height) == (slow.step, slow.width, slow.height) == (7, 30, 20)
    decoded = [np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")) for e in (fast, slow)]
    assert (decoded[0] == image.permute(1, 2, 0).numpy()).all() and (decoded[0] == decoded[1]).all()


def test_release_workers_stops_a_loaders_persistent_workers():
    from torch.utils.data import DataLoader

    from handlers.adapters import release_workers

    loader = DataLoader(list(range(8)), batch_size=4, num_workers=1, persistent_workers=True)
    assert [len(b) for b in loader] == [4, 4]
    workers = list(loader._iterator._workers)
    assert release_workers(loader) and loader._iterator is None
    for w in workers:
        w.join(timeout=10)
    assert not any(w.is_alive() for w in workers)
    assert not release_workers(loader) and [len(b) for b in loader] == [4, 4]  # usable again
    release_workers(loader)


def test_stream_progress_reads_a_stateful_dataloaders_state():
    from torch.utils.data import IterableDataset

    from engine.stream import make_stream_loader
    from handlers.adapters import stream_progress

    class Stream(IterableDataset):
        def __iter__(self):
            yield from range(10)

    loader = make_stream_loader(Stream(), 4)
    batches = iter(loader)
    next(batches)
    assert stream_progress(loader.state_dict()) == (1, False)
    list(batches)
    assert stream_progress(loader.state_dict()) == (3, True)
