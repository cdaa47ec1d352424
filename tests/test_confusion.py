"""The confusion counts for any number of classes: dense or sparse alike, the picture while it is readable, the
table of mistakes beyond, read back by TensorBoard's own reader."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from engine import RunSettings
from handlers import fit, seed_everything
from handlers.confusion import DENSE_CLASSES, MisclassifiedCollector, confusion_table, most_confused, per_class_recall


def collect(classes: int, batches: list[tuple], limit: int = 0) -> MisclassifiedCollector:
    evaluator = Engine(lambda engine, batch: batch)
    collector = MisclassifiedCollector(limit=limit).attach(evaluator)
    evaluator.run(batches)
    return collector


def random_batches(classes: int, n: int = 4, size: int = 50) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(classes)
    return [(torch.randn(size, classes, generator=g), torch.randint(0, classes, (size,), generator=g))
            for _ in range(n)]  # fmt: skip


@pytest.mark.parametrize("classes", [3, DENSE_CLASSES + 7])  # dense counts; sparse pairs
def test_the_counts_are_every_true_and_predicted_pair_dense_or_sparse(classes):
    batches = random_batches(classes)
    counts = collect(classes, batches).confusion
    assert counts.is_sparse == (classes > DENSE_CLASSES) and counts.shape == (classes, classes)
    expected = torch.zeros(classes, classes, dtype=torch.long)
    for y_pred, y in batches:
        for true, pred in zip(y.tolist(), y_pred.argmax(1).tolist()):
            expected[true, pred] += 1
    assert torch.equal(counts.to_dense(), expected)


def test_ignored_labels_and_batches_that_are_not_labels_count_nowhere():
    y_pred = torch.eye(3)[[0, 1, 2, 2]] * 5
    batches = [(y_pred, torch.tensor([0, -100, 2, 1])), (y_pred, torch.rand(4, 3)), ({"a": y_pred}, torch.zeros(4))]
    counts = collect(3, batches).confusion
    assert counts.tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1]]


def test_a_dict_or_a_tuple_of_inputs_shows_no_images_and_still_counts():
    evaluator = Engine(lambda engine, batch: batch[1:])
    evaluator.add_event_handler(Events.ITERATION_STARTED, lambda e: setattr(e.state, "inputs", e.state.batch[0]))
    collector = MisclassifiedCollector(limit=8).attach(evaluator)
    y_pred, y = torch.eye(3)[[0, 1, 2]], torch.tensor([1, 1, 1])
    evaluator.run([({"ids": torch.zeros(3, 5), "mask": torch.ones(3, 5)}, y_pred, y),
                   ((torch.zeros(3, 1, 4, 4), torch.ones(3)), y_pred, y)])  # fmt: skip
    assert collector.images == [] and int(collector.confusion.sum()) == 6


def test_most_confused_and_recall_read_dense_and_sparse_counts_alike():
    dense = torch.tensor([[5, 3, 0], [1, 7, 4], [0, 4, 2]])
    for counts in (dense, dense.to_sparse()):
        assert most_confused(counts, top=3) == [(1, 2, 4), (2, 1, 4), (0, 1, 3)]
        total, right = per_class_recall(counts)
        assert total.tolist() == [8, 12, 6] and right.tolist() == [5, 7, 2]
    table = confusion_table(dense, top=2, worst=2)
    assert "| 1 | 2 | 4 | 33.3% |" in table and "| 0 | 1 | 3 |" not in table
    assert table.endswith("Lowest recall: class 2 33.3% of 6, class 1 58.3% of 12")


@pytest.mark.parametrize("classes, picture", [(4, True), (60, False)])
def test_a_run_draws_the_matrix_while_it_is_readable_and_a_table_beyond(tmp_path, classes, picture):
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, 8, generator=g)
    y = torch.randint(0, classes, (640,), generator=g)
    x = centres[y] + 0.3 * torch.randn(640, 8, generator=g)
    fit(nn.Linear(8, classes), (x[:512], y[:512]), (x[512:], y[512:]),
        RunSettings(output_dir=str(tmp_path / "r"), epochs=1, batch_size=64, progress=False, log_every=0))
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert ("val/confusion_matrix" in acc.Tags()["images"]) == picture
    texts = [t for t in acc.Tags()["tensors"] if t.startswith("val/most_confused")]
    assert bool(texts) == (not picture)
    if not picture:
        text = acc.Tensors(texts[0])[0].tensor_proto.string_val[0].decode()
        assert text.startswith(f"{classes} classes, 128 samples, ") and "| true | predicted | count |" in text
