"""`verl-async-prepare`: a local copy of a dataset -> our rows (parquet), nothing downloaded.

    verl-async-prepare geo3k --src /data/geometry3k --out /data/geo3k_rows
    verl-async-prepare gsm8k --src /data/gsm8k --out /data/gsm8k_rows

--src is the HF datasets on-disk layout (`save_to_disk`: dataset_dict.json + one folder of
.arrow files per split, or one split's folder with state.json), a hub-style folder of parquet
files (train-00000-of-00001.parquet, main/test-....parquet), or a single .parquet/.jsonl/.arrow
file. Each split becomes OUT/<split>.parquet in the layout `data.train_files` reads. geo3k rows
(hiyouga/geometry3k: images, problem with "<image>" markers, answer) get image parts and their
image bytes; a row whose image cannot be read is a counted, reported skip.
"""

import argparse
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from verl_async.data.rows import LoadReport
from verl_async.data.vision import IMAGE_MARKER, ImageError, load_image, split_markers

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "valid", "dev", "test")
GEO3K_INSTRUCTION = "Think step by step, then give the final answer in \\boxed{}."
GSM8K_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."


# ---- reading a local dataset copy -----------------------------------------------------------

def _read_arrow(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            table = pa.ipc.open_stream(source).read_all()  # what datasets' save_to_disk writes
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(source).read_all()
    return table.to_pylist()


def _read_file(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".arrow":
        return _read_arrow(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".json"):
        with path.open() as f:
            return [json.loads(line) for line in f if line.strip()]
    raise ValueError(f"{path}: unknown suffix; use .arrow, .parquet or .jsonl")


def _split_of(path: Path) -> str:
    """train-00000-of-00001.parquet -> train; test.parquet -> test."""
    stem = path.name.split(".")[0]
    head = stem.split("-")[0]
    return head if head in SPLITS else stem


def find_splits(src: Path) -> dict[str, list[Path]]:
    """Split name -> its data files, for every layout the module docstring lists."""
    if src.is_file():
        return {"train": [src]}
    if (src / "dataset_dict.json").exists():
        names = json.loads((src / "dataset_dict.json").read_text())["splits"]
        return {name: _split_files(src / name) for name in names}
    if (src / "state.json").exists():
        return {"train": _split_files(src)}
    splits: dict[str, list[Path]] = {}
    for f in sorted(p for ext in ("parquet", "arrow", "jsonl") for p in src.rglob(f"*.{ext}")):
        splits.setdefault(_split_of(f), []).append(f)
    if not splits:
        raise FileNotFoundError(f"--src {src}: no dataset_dict.json, state.json or .parquet/.arrow/.jsonl files found")
    return splits


def _split_files(folder: Path) -> list[Path]:
    state = json.loads((folder / "state.json").read_text())
    return [folder / f["filename"] for f in state["_data_files"]]


# ---- mapping records to our rows ---------------------------------------------------------------

def _image_bytes(ref: Any, base: Path) -> bytes:
    """An HF Image value ({bytes, path}), raw bytes or a path -> PNG/JPEG bytes, checked to decode."""
    if isinstance(ref, dict) and ref.get("bytes"):
        data = ref["bytes"]
    elif isinstance(ref, dict | str):
        path = Path(ref["path"] if isinstance(ref, dict) else ref)
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise ImageError(f"image file {path} does not exist")
        data = path.read_bytes()
    elif isinstance(ref, bytes):
        data = ref
    else:
        raise ImageError(f"unsupported image value of type {type(ref).__name__}")
    load_image(data)  # raises ImageError if it does not decode
    return data


def geo3k_row(rec: dict[str, Any], split: str, index: int, base: Path) -> dict[str, Any]:
    images = [_image_bytes(ref, base) for ref in rec.get("images") or []]
    problem = str(rec["problem"]).strip()
    parts = split_markers(problem) if IMAGE_MARKER in problem else (
        [{"type": "image"} for _ in images] + [{"type": "text", "text": problem}])
    n_parts = sum(p["type"] == "image" for p in parts)
    if n_parts != len(images):
        raise ImageError(f"{n_parts} <image> markers but {len(images)} images")
    parts.append({"type": "text", "text": ("\n" if parts else "") + GEO3K_INSTRUCTION})
    parts = [{"type": p["type"], "text": p.get("text")} for p in parts]  # one struct type for parquet
    return {"id": f"geo3k-{split}-{index}", "prompt": [{"role": "user", "content": parts}],
            "ground_truth": str(rec["answer"]).strip(), "images": images, "data_source": "geo3k",
            "extra_info": {"split": split, "index": index}}


def gsm8k_row(rec: dict[str, Any], split: str, index: int, base: Path) -> dict[str, Any]:
    answer = str(rec["answer"])
    if "####" not in answer:
        raise ValueError("answer has no '#### <number>' line")
    final = answer.split("####")[-1].strip().replace(",", "")
    return {"id": f"gsm8k-{split}-{index}",
            "prompt": [{"role": "user", "content": f"{rec['question'].strip()} {GSM8K_INSTRUCTION}"}],
            "ground_truth": final, "data_source": "gsm8k",
            "extra_info": {"split": split, "index": index, "solution": answer}}


DATASETS: dict[str, Callable[[dict[str, Any], str, int, Path], dict[str, Any]]] = {
    "geo3k": geo3k_row, "gsm8k": gsm8k_row}


def convert(name: str, files: list[Path], split: str, report: LoadReport, limit: int = 0) -> Iterator[dict[str, Any]]:
    index = 0
    for path in files:
        for rec in _read_file(path):
            if limit and index >= limit:
                return
            try:
                yield DATASETS[name](rec, split, index, path.parent)
            except (KeyError, ValueError) as e:  # ImageError is a ValueError
                report.skip(f"{type(e).__name__}: {e}", f"{path} row {index}")
            index += 1


def prepare(name: str, src: str, out: str, limit: int = 0) -> dict[str, LoadReport]:
    """Convert every split of `src`; write OUT/<split>.parquet; return a report per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    src_path, out_path = Path(src).expanduser(), Path(out).expanduser()
    if not src_path.exists():
        raise FileNotFoundError(f"--src {src_path} does not exist (nothing is downloaded: point it at a local copy)")
    out_path.mkdir(parents=True, exist_ok=True)
    reports = {}
    for split, files in find_splits(src_path).items():
        report = LoadReport()
        rows = list(convert(name, files, split, report, limit))
        report.loaded = len(rows)
        if rows:
            pq.write_table(pa.Table.from_pylist(rows), out_path / f"{split}.parquet")
        logger.info("%s %s: %d rows -> %s, %d skipped %s", name, split, len(rows), out_path / f"{split}.parquet",
                    sum(report.skipped.values()), report.skipped or "")
        reports[split] = report
    return reports


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Turn a local dataset copy into verl_async rows (parquet).")
    p.add_argument("dataset", choices=sorted(DATASETS))
    p.add_argument("--src", required=True, help="HF datasets on-disk folder, folder of parquet files, or one file")
    p.add_argument("--out", required=True, help="output folder: <split>.parquet per split")
    p.add_argument("--limit", type=int, default=0, help="at most this many rows per split (0: all)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prepare(args.dataset, args.src, args.out, args.limit)


if __name__ == "__main__":
    main()
