"""What the validation got wrong: its confusion counts (any number of classes, in time and memory linear in
the samples) and its first misclassified samples, for TensorBoard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

__all__ = ["DENSE_CLASSES", "PICTURE_CLASSES", "MisclassifiedCollector", "most_confused", "per_class_recall"]

DENSE_CLASSES = 1024  # up to this many classes the counts are a dense [C, C] tensor (8 MiB); beyond, sparse
PICTURE_CLASSES = 50  # up to this many the matrix is drawn (a 36 px cell each: readable); beyond, a table


class MisclassifiedCollector:
    """Keeps the first ``limit`` misclassified samples of each evaluator run, and its confusion counts
    (summed over processes in a distributed run). ``num_classes``: default, the width of the logits.

    ``confusion`` (after a run): ``[C, C]`` int64 on the CPU, rows the true class and columns the
    predicted one; dense up to :data:`DENSE_CLASSES` classes, a sparse COO tensor beyond (only the pairs
    that occurred: 10,000 classes cost what their samples do, not 10^8 counts). Counting stays on the
    outputs' device without waiting for it: one ``index_add_`` of a batch's pairs (or, sparse, the
    pairs kept until the run's end). Dense predictions (``[N, C, H, W]`` against ``[N, H, W]``:
    segmentation) count every pixel, and keep no sample images. Batches it cannot count (targets that
    are not class labels) or show (inputs that are not images: a dict, text) are skipped, not an error.
    """

    def __init__(self, num_classes: int | None = None, limit: int = 64,
                 view: Callable[[Any], tuple[Any, Any]] | None = None) -> None:  # fmt: skip
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2 or None, got {num_classes!r}")
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
        self.num_classes = num_classes
        self.limit = limit
        self.view = view  # (y_pred, y) -> (y_pred, labels): soft labels by their most likely class
        self.images: list[torch.Tensor] = []
        self.labels: list[tuple[int, int]] = []
        self.confusion: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None  # dense: C * C counts and a last slot for what is not a class
        self._pairs: list[torch.Tensor] = []  # sparse: each batch's true * C + predicted

    def attach(self, evaluator: Engine) -> MisclassifiedCollector:
        evaluator.add_event_handler(Events.STARTED, self.reset)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        evaluator.add_event_handler(Events.COMPLETED, self._reduce)
        return self

    def reset(self, engine: Engine | None = None) -> None:
        self.images, self.labels, self._pairs = [], [], []
        if self._counts is not None:
            self._counts.zero_()

    def update(self, engine: Engine) -> None:
        output = engine.state.output
        y_pred, y = self.view(output) if self.view is not None else (output[0], output[1])
        if not (isinstance(y_pred, torch.Tensor) and isinstance(y, torch.Tensor) and y_pred.dim() >= 2
                and y.dim() == y_pred.dim() - 1 and len(y) == len(y_pred) and y.shape[1:] == y_pred.shape[2:]
                and not y.is_floating_point()):  # fmt: skip
            return
        classes = self.num_classes = self.num_classes or y_pred.shape[1]
        pred = y_pred.argmax(1)
        if y.dim() > 1:  # dense predictions ([N, C, H, W] against [N, H, W]): every pixel counts, no sample images
            self._count(pred.flatten(), y.flatten(), classes)
            return
        self._count(pred, y, classes)
        if len(self.images) < self.limit:
            self._keep_images(getattr(engine.state, "inputs", None), pred, y)

    def _count(self, pred: torch.Tensor, y: torch.Tensor, classes: int) -> None:
        known = (y >= 0) & (y < classes)  # an ignored label (-100) counts nowhere
        flat = torch.where(known, y.long() * classes + pred, classes * classes)
        if classes <= DENSE_CLASSES:
            if self._counts is None or self._counts.device != flat.device:
                self._counts = torch.zeros(classes * classes + 1, dtype=torch.long, device=flat.device)
            self._counts.index_add_(0, flat, torch.ones_like(flat))
        else:
            self._pairs.append(flat)

    def _keep_images(self, x: Any, pred: torch.Tensor, y: torch.Tensor) -> None:
        """The first misclassified samples while there is room (a wait for the device each batch until then)."""
        if not _is_image_batch(x) or x.shape[0] != y.shape[0]:
            return
        wrong = (pred != y).nonzero().flatten()[: self.limit - len(self.images)].cpu()
        for i in wrong.tolist():
            self.images.append(x[i].detach().float().cpu().reshape(-1, *x.shape[-2:]))
            self.labels.append((int(pred[i]), int(y[i])))

    def _reduce(self, engine: Engine) -> None:
        """The run's counts, summed over processes, onto the CPU (the host waits here, once a run)."""
        classes = self.num_classes
        if classes is None:
            self.confusion = None
            return
        world = idist.get_world_size()
        if classes <= DENSE_CLASSES:
            counts = self._counts if self._counts is not None else torch.zeros(classes * classes + 1, dtype=torch.long)
            counts = idist.all_reduce(counts.clone()) if world > 1 else counts
            self.confusion = counts[:-1].view(classes, classes).cpu()
            return
        flat = torch.cat(self._pairs) if self._pairs else torch.zeros(0, dtype=torch.long)
        if world > 1:  # every rank's pairs, padded to the longest with "not a class"
            longest = int(idist.all_reduce(torch.tensor(len(flat)), op="MAX"))
            pad = torch.full((longest - len(flat),), classes * classes, dtype=torch.long, device=flat.device)
            flat = idist.all_gather(torch.cat([flat, pad]))
        pairs, counts = torch.unique(flat.cpu(), return_counts=True)
        keep = pairs < classes * classes
        pairs, counts = pairs[keep], counts[keep]
        self.confusion = torch.sparse_coo_tensor(torch.stack([pairs // classes, pairs % classes]), counts,
                                                 (classes, classes), check_invariants=True).coalesce()  # fmt: skip
        self._pairs = []


def _is_image_batch(x: Any) -> bool:
    """(N, H, W) grey, or (N, C, H, W) with 1 or 3 channels: something to show as pictures."""
    return isinstance(x, torch.Tensor) and (x.dim() == 3 or (x.dim() == 4 and x.shape[1] in (1, 3)))


def _entries(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(true, predicted, count) of every non-zero count, dense or sparse alike."""
    if counts.is_sparse:
        counts = counts.coalesce()
        (true, pred), values = counts.indices(), counts.values()
        return true, pred, values
    true, pred = counts.nonzero(as_tuple=True)
    return true, pred, counts[true, pred]


def most_confused(counts: torch.Tensor, top: int = 20) -> list[tuple[int, int, int]]:
    """The ``top`` most frequent mistakes, ``(true, predicted, count)``, most frequent first (ties: by class)."""
    true, pred, values = _entries(counts)
    off = true != pred
    true, pred, values = true[off], pred[off], values[off]
    order = sorted(zip((-values).tolist(), true.tolist(), pred.tolist()))[:top]
    return [(t, p, -v) for v, t, p in order]


def per_class_recall(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples of each true class, of them predicted right), from dense or sparse counts."""
    classes = counts.shape[0]
    true, pred, values = _entries(counts)
    total = torch.zeros(classes, dtype=torch.long).index_add_(0, true, values)
    right = torch.zeros(classes, dtype=torch.long).index_add_(0, true[true == pred], values[true == pred])
    return total, right


def confusion_table(counts: torch.Tensor, top: int = 20, worst: int = 10) -> str:
    """Markdown for TensorBoard's text tab, when the classes are too many to draw: the ``top`` most
    frequent mistakes (each as a share of its true class) and the ``worst`` classes by recall."""
    total, right = per_class_recall(counts)
    lines = [f"{counts.shape[0]} classes, {int(total.sum())} samples, {int(right.sum())} right.", "",
             "| true | predicted | count | share of the true class |", "|---:|---:|---:|---:|"]
    for true, pred, n in most_confused(counts, top):
        lines.append(f"| {true} | {pred} | {n} | {n / max(1, int(total[true])):.1%} |")
    present = total.nonzero().flatten()
    recall = right[present].double() / total[present]
    order = sorted(zip(recall.tolist(), present.tolist()))[:worst]
    lines += ["", "Lowest recall: " + ", ".join(f"class {c} {r:.1%} of {int(total[c])}" for r, c in order)]
    return "\n".join(lines)
