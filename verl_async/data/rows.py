"""Load rows in the common RL layout from parquet or JSONL.

A row: `prompt` (chat messages; content a string or a list of {type: text|image} parts),
`ground_truth` (or `reward_model.ground_truth`), optional `images`, `extra_info`, `data_source`.
A malformed row is a counted, reported skip, never a crash and never a silent drop.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verl_async.data.vision import check_row_images, has_images
from verl_async.types import PromptRow

logger = logging.getLogger(__name__)


@dataclass
class LoadReport:
    """How many rows each file gave, and why any were skipped."""

    loaded: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        logger.warning("skipping row %s: %s", where, reason)


def _read_records(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    raise ValueError(f"data.train_files: {path} has an unknown suffix; use .parquet or .jsonl.")


def row_from_record(rec: dict[str, Any], default_id: str) -> PromptRow:
    """Map one record to a PromptRow; raise ValueError with the reason if it is malformed."""
    messages = rec.get("prompt")
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise ValueError("missing or empty `prompt` messages")
    gt = rec.get("ground_truth")
    if gt is None and isinstance(rec.get("reward_model"), dict):
        gt = rec["reward_model"].get("ground_truth")
    extra = rec.get("extra_info") or {}
    return PromptRow(
        prompt_id=str(rec.get("id") or extra.get("id") or default_id),
        messages=list(messages), ground_truth="" if gt is None else str(gt),
        images=list(rec.get("images") or []), extra_info=dict(extra), data_source=str(rec.get("data_source") or ""),
    )


def load_rows(files: list[str], report: LoadReport | None = None) -> list[PromptRow]:
    report = report or LoadReport()
    rows = []
    for name in files:
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data.train_files: {path} does not exist; fix the path.")
        for i, rec in enumerate(_read_records(path)):
            try:
                row = row_from_record(rec, default_id=f"{path.stem}-{i}")
                if has_images(row):  # a missing or unreadable image skips the row (ImageError)
                    check_row_images(row, base_dir=path.parent)
                rows.append(row)
            except ValueError as e:
                report.skip(str(e), f"{path}:{i}")
    report.loaded += len(rows)
    return rows


def write_jsonl(rows: list[PromptRow], path: str) -> None:
    """Write rows in the layout `load_rows` reads (used for shipped/generated data files)."""
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"id": r.prompt_id, "prompt": r.messages, "ground_truth": r.ground_truth,
                                "images": r.images, "extra_info": r.extra_info, "data_source": r.data_source}) + "\n")
