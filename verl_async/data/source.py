"""An endless, seeded, resumable stream of prompt rows (the data position is checkpointed)."""

import random
from dataclasses import dataclass

from verl_async.config import DataConfig
from verl_async.data.rows import LoadReport, load_rows
from verl_async.data.tasks import generate_task
from verl_async.types import PromptRow


@dataclass
class DataPosition:
    """Where the stream is: epoch and index into that epoch's order. Restoring it rereads nothing."""

    epoch: int = 0
    index: int = 0


class PromptSource:
    """Rows in a seeded order per epoch; `position` is all the state a checkpoint needs."""

    def __init__(self, rows: list[PromptRow], shuffle: bool, seed: int, position: DataPosition | None = None):
        if not rows:
            raise ValueError("the dataset has no usable rows: check data.train_files (or data.generated_task).")
        self.rows = rows
        self.shuffle = shuffle
        self.seed = seed
        self.position = position or DataPosition()
        self._order = self._epoch_order(self.position.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    def next(self) -> PromptRow:
        if self.position.index >= len(self._order):
            self.position = DataPosition(self.position.epoch + 1, 0)
            self._order = self._epoch_order(self.position.epoch)
        row = self.rows[self._order[self.position.index]]
        self.position = DataPosition(self.position.epoch, self.position.index + 1)
        return row


def make_source(data: DataConfig, position: DataPosition | None = None, report: LoadReport | None = None) -> PromptSource:
    rows = (load_rows(data.train_files, report) if data.train_files
            else generate_task(data.generated_task, data.num_generated_prompts, data.seed))
    return PromptSource(rows, data.shuffle, data.seed, position)
