"""The non-finite update policy: skip an update whose gradients are NaN/inf, count it, stop after N in a row.

What a skipped update means for the counters: the batch was consumed, so the `step` still counts
and `policy_version` (which counts steps) still advances; the weights of the new version are
exactly those of the previous one. Nothing is silent: every skip is logged and counted
(`train/nonfinite_skips`, monotone), and `max_in_a_row` consecutive skips raise
`NonFiniteUpdateError`, which ends the run (resume from the last checkpoint after fixing the cause).

The decision uses the global gradient norm (after clipping's reduction, identical on every rank),
so all ranks skip together; a non-finite loss reaches it through the backward pass.
"""

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class NonFiniteUpdateError(RuntimeError):
    """Too many optimizer updates in a row had non-finite gradients."""


@dataclass
class NonFiniteGuard:
    max_in_a_row: int  # trainer.max_nonfinite_skips
    skips: int = 0  # updates skipped so far (monotone)
    in_a_row: int = 0  # the current run of skipped updates

    def allow_update(self, step: int, grad_norm: float) -> bool:
        """True: apply the optimizer update. False: skip it (counted). Raises after max_in_a_row skips in a row."""
        if math.isfinite(grad_norm):
            self.in_a_row = 0
            return True
        self.skips += 1
        self.in_a_row += 1
        logger.warning("step %d: gradient norm %s, optimizer update skipped (%d in a row, %d in all)",
                       step, grad_norm, self.in_a_row, self.skips)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteUpdateError(
                f"step {step}: {self.in_a_row} optimizer updates in a row had a non-finite gradient norm "
                f"({grad_norm}); the weights are those of the last finite update. Likely causes: a learning "
                "rate too high for the model (trainer.lr), fp16 overflow (model.dtype), or extreme importance "
                "ratios (algorithm.is_correction / is_threshold). Fix it and resume from the last checkpoint "
                "(resume=true); trainer.max_nonfinite_skips sets how many skips in a row are tolerated.")
        return False
