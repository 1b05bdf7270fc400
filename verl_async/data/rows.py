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


def _read_records(path: Path, report: LoadReport, limit: int = 0) -> list[tuple[int, Any]]:
    """(index, record) of every record (the first `limit` when > 0); a JSONL line that does not
    parse is a counted skip."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        if limit:
            batch = next(pq.ParquetFile(path).iter_batches(batch_size=limit), None)
            return list(enumerate(batch.to_pylist() if batch is not None else []))
        return list(enumerate(pq.read_table(path).to_pylist()))
    if path.suffix in (".jsonl", ".json"):
        records = []
        with path.open() as f:
            for i, line in enumerate(f):
                if limit and i >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    records.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    report.skip("malformed JSON line", f"{path}:{i} ({e})")
        return records
    raise ValueError(f"data.train_files: {path} has an unknown suffix; use .parquet or .jsonl.")


def _messages(prompt: Any) -> list[dict[str, Any]]:
    """The row's chat messages; ValueError says what is wrong with them."""
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("missing or empty `prompt` messages")
    for m in prompt:
        if not isinstance(m, dict):
            raise ValueError(f"`prompt` holds a {type(m).__name__}, not chat messages: use one string or "
                             "a list of {role, content} messages")
        if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str | list):
            raise ValueError("a `prompt` message lacks a string `role` or a string/list `content`")
        if isinstance(m["content"], list) and not all(isinstance(p, dict) for p in m["content"]):
            raise ValueError("a message's `content` list holds non-dict parts: use {type: text|image, ...} parts")
    return list(prompt)


def row_from_record(rec: Any, default_id: str) -> PromptRow:
    """Map one record to a PromptRow; raise ValueError with the reason if it is malformed."""
    if not isinstance(rec, dict):
        raise ValueError(f"the record is a {type(rec).__name__}, not an object")
    messages = _messages(rec.get("prompt"))
    gt = rec.get("ground_truth")
    if gt is None and isinstance(rec.get("reward_model"), dict):
        gt = rec["reward_model"].get("ground_truth")
    extra = rec.get("extra_info")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise ValueError(f"`extra_info` is a {type(extra).__name__}, not an object")
    images = rec.get("images")
    images = [] if images is None else images
    if not isinstance(images, list):
        raise ValueError(f"`images` is a {type(images).__name__}, not a list")
    return PromptRow(
        prompt_id=str(rec.get("id") or extra.get("id") or default_id),
        messages=messages, ground_truth="" if gt is None else str(gt),
        images=list(images), extra_info=dict(extra), data_source=str(rec.get("data_source") or ""),
    )


def load_rows(files: list[str], report: LoadReport | None = None, limit: int = 0) -> list[PromptRow]:
    """Every usable row of `files` (of the first `limit` records of each, when > 0)."""
    report = report or LoadReport()
    rows = []
    for name in files:
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"data.train_files: {path} does not exist; fix the path.")
        for i, rec in _read_records(path, report, limit):
            try:
                row = row_from_record(rec, default_id=f"{path.stem}-{i}")
                if has_images(row):  # a missing or unreadable image skips the row (ImageError)
                    check_row_images(row, base_dir=path.parent)
                rows.append(row)
            except ValueError as e:
                report.skip(str(e), f"{path}:{i}")
            except (KeyError, TypeError) as e:  # a row shaped in a way no check above foresaw: still a skip
                report.skip(f"malformed row ({type(e).__name__}: {e})", f"{path}:{i}")
    report.loaded += len(rows)
    return rows


def write_jsonl(rows: list[PromptRow], path: str) -> None:
    """Write rows in the layout `load_rows` reads (used for shipped/generated data files)."""
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"id": r.prompt_id, "prompt": r.messages, "ground_truth": r.ground_truth,
                                "images": r.images, "extra_info": r.extra_info, "data_source": r.data_source}) + "\n")
