"""The user's data and model, checked: each concern in its own module.

- :mod:`engine.checks.explain`: error translation (why a forward or a loss failed, in one line);
- :mod:`engine.checks.preflight`: the first batches of each set through the model, before the first step;
- :mod:`engine.checks.guard`: the per-step label guard on the host (:class:`LabelGuard`);
- :mod:`engine.checks.lints`: what is odd but not wrong (raw pixels, imbalance, a final Softmax).
"""

from engine.checks.explain import diagnose, input_mismatch
from engine.checks.guard import BatchError, LabelGuard, check_targets
from engine.checks.lints import class_balance, has_batch_norm, pixel_scale, probability_outputs, unregistered
from engine.checks.preflight import BatchCheck, check_batch, check_first_batches, peek_batch

__all__ = ["BatchCheck", "BatchError", "LabelGuard", "check_batch", "check_first_batches", "check_targets",
           "class_balance", "diagnose", "has_batch_norm", "input_mismatch", "peek_batch", "pixel_scale",
           "probability_outputs", "unregistered"]
