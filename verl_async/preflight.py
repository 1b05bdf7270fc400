"""Checks run before Ray and vLLM start: every import path, file and asset the job names.

An engine start costs a minute or more; a typo in `data.reward_fn` or a data path must not be
found after it. Every problem found is reported at once, each with its key and how to fix it.
Data files are read only as far as their first PREFLIGHT_ROWS records (a huge dataset is
loaded once, by the rollouter): a file whose sample has no usable row fails here.
"""

import logging
import os
from collections.abc import Callable
from pathlib import Path

from verl_async.config import ConfigError, JobConfig

logger = logging.getLogger(__name__)

PREFLIGHT_ROWS = 256
SUFFIXES = (".parquet", ".jsonl", ".json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def preflight(job: JobConfig) -> None:
    """Raise ConfigError listing every problem found; log what was checked."""
    checks: list[tuple[str, Callable[[], None]]] = [
        ("data.reward_fn", lambda: _reward(job.data.reward_fn)),
        ("model.path", lambda: _model(job.model.path)),
    ]
    if job.data.train_files:
        checks += [("data.train_files", lambda f=f: _data_file(f)) for f in job.data.train_files]
    else:
        checks.append(("data.generated_task", lambda: _generated_task(job.data.generated_task)))
    if job.output_dir:
        checks.append(("output_dir", lambda: _writable(job.output_dir)))
    problems = []
    for key, fn in checks:
        try:
            fn()
        except (ValueError, OSError, ImportError) as e:
            problems.append(str(e) if str(e).startswith(key) else f"{key}: {e}")
    if problems:
        raise ConfigError("the job cannot start (checked before Ray and vLLM):\n  " + "\n  ".join(problems))
    logger.info("preflight passed: reward %s, model %s, %s", job.data.reward_fn, job.model.path,
                f"{len(job.data.train_files)} data file(s)" if job.data.train_files else
                f"generated task {job.data.generated_task}")


def _reward(name: str) -> None:
    from verl_async.rewards import resolve_reward

    resolve_reward(name)


def _model(path: str) -> None:
    """An asset name (built later, locally) or an HF folder with a config and a tokenizer."""
    from verl_async.config.model import ASSET_KINDS

    if path in ASSET_KINDS:
        return
    folder = Path(os.path.expanduser(path))
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{path!r} is not a model folder (no config.json): point it at a local HF folder, "
                                f"or use an asset name ({', '.join(ASSET_KINDS)}); nothing is downloaded.")
    if not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"{path!r} has no tokenizer ({', '.join(TOKENIZER_FILES)}): save the tokenizer "
                                "into the model folder.")


def _data_file(name: str) -> None:
    from verl_async.data.rows import LoadReport, load_rows

    path = Path(name).expanduser()
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path} has an unknown suffix: use one of {', '.join(SUFFIXES)}.")
    report = LoadReport()
    if not load_rows([str(path)], report, limit=PREFLIGHT_ROWS):
        reasons = "; ".join(f"{reason} (x{n})" for reason, n in report.skipped.items()) or "the file is empty"
        raise ValueError(f"{path}: none of its first {PREFLIGHT_ROWS} rows is usable: {reasons}.")


def _generated_task(name: str) -> None:
    from verl_async.data.tasks import TASKS

    if name not in TASKS:
        raise ValueError(f"{name!r} is unknown: choose one of {', '.join(TASKS)}.")


def _writable(output_dir: str) -> None:
    path = Path(output_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
        raise PermissionError(f"{path} is not writable.")
