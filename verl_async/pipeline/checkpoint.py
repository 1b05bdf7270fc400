"""Pipeline checkpoints: the trainer's state plus everything needed to lose no sample.

The trainer saves model/optimizer/scheduler/RNG; the pipeline adds, as `extra_state`, the
step, the data position, the rows still in flight (regenerated on resume) and the queued
groups (put back on resume). Counters are re-derived from what was consumed.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from verl_async.data.source import DataPosition
from verl_async.types import Group, PromptRow

logger = logging.getLogger(__name__)


@dataclass
class ResumeState:
    step: int = 0  # optimizer steps completed (= the trainer's policy_version)
    position: DataPosition = field(default_factory=DataPosition)
    pending_rows: list[PromptRow] = field(default_factory=list)
    queued_groups: list[Group] = field(default_factory=list)


def checkpoint_dir(output_dir: str, step: int) -> Path:
    return Path(output_dir) / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(output_dir: str) -> Path | None:
    done = sorted(p.parent for p in (Path(output_dir) / "checkpoints").glob("step_*/COMPLETE"))
    return done[-1] if done else None


def save(trainer, output_dir: str, state: ResumeState) -> Path:
    path = checkpoint_dir(output_dir, state.step)
    path.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(str(path / "trainer"), {"pipeline": state})
    (path / "COMPLETE").write_text(str(state.step))  # written last: a half-written checkpoint is never resumed
    logger.info("checkpoint at step %d: %s (%d rows in flight, %d groups queued)", state.step, path,
                len(state.pending_rows), len(state.queued_groups))
    return path


def restore(trainer, output_dir: str) -> ResumeState | None:
    path = latest_checkpoint(output_dir)
    if path is None:
        logger.warning("resume=true but %s has no complete checkpoint: starting from step 0", output_dir)
        return None
    state = trainer.load_checkpoint(str(path / "trainer"))["pipeline"]
    logger.info("resumed from %s at step %d", path, state.step)
    return state
