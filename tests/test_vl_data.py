"""VL data path without an engine: the tiny-vl asset, image rows and their skips, processor-built
prompts, the colours task and rewards, verl-async-prepare on local dataset layouts, and the
rollouter's VL path against a fake server (processor outputs travel with the samples)."""

import asyncio
import hashlib
import io
import json
from pathlib import Path

import pytest

from verl_async.data.prompts import PromptEncoder, encode_text_prompt
from verl_async.data.rows import LoadReport, load_rows
from verl_async.data.vision import (
    ImageError,
    collapse_image_slots,
    image_refs,
    load_image,
    solid_png,
)
from verl_async.types import PromptRow


@pytest.fixture(scope="module")
def vl_path(assets_dir) -> str:
    from verl_async.assets.build import ensure_asset

    return str(ensure_asset(assets_dir, "tiny-vl"))


@pytest.fixture(scope="module")
def encoder(vl_path) -> PromptEncoder:
    return PromptEncoder.from_model(vl_path, max_images=2)


def _png(rgb=(200, 10, 10), size=(64, 64)) -> bytes:
    return solid_png(rgb, size)


def _parts(text="What colour?", images=1):
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


# ---- the asset ---------------------------------------------------------------------------------

def test_vl_asset_is_deterministic_and_has_processor(tmp_path, vl_path):
    from transformers import AutoConfig, AutoProcessor

    from verl_async.assets.vl import build_tiny_vl

    build_tiny_vl(tmp_path / "again", seed=0)
    digest = [hashlib.sha256((Path(p) / "model.safetensors").read_bytes()).hexdigest() for p in (vl_path, tmp_path / "again")]
    assert digest[0] == digest[1]
    cfg = AutoConfig.from_pretrained(vl_path)
    assert cfg.architectures == ["Qwen3VLForConditionalGeneration"]
    assert cfg.vision_config.patch_size == 16 and cfg.vision_config.spatial_merge_size == 2
    proc = AutoProcessor.from_pretrained(vl_path)
    assert type(proc).__name__ == "Qwen3VLProcessor"
    assert proc.tokenizer.convert_ids_to_tokens(cfg.image_token_id) == "<|image_pad|>"


# ---- rows and skips ----------------------------------------------------------------------------

def test_vl_rows_load_from_jsonl_and_parquet_and_skip_bad_images(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(_png())
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png at all")
    recs = [
        {"id": "ok", "prompt": _parts(), "ground_truth": "red", "images": ["img/ok.png"]},  # relative to the file
        {"id": "missing", "prompt": _parts(), "ground_truth": "red", "images": ["img/nowhere.png"]},
        {"id": "broken", "prompt": _parts(), "ground_truth": "red", "images": ["img/broken.png"]},
        {"id": "no-image", "prompt": _parts(), "ground_truth": "red"},  # an image part with no image
        {"id": "marker", "prompt": "<image>\nWhat colour?", "ground_truth": "red", "images": ["img/ok.png"]},
        {"id": "text", "prompt": "2 + 2?", "ground_truth": "4"},
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in recs))
    report = LoadReport()
    rows = load_rows([str(jsonl)], report)
    assert [r.prompt_id for r in rows] == ["ok", "marker", "text"]
    assert sum(report.skipped.values()) == 3 and report.loaded == 3
    assert any("does not exist" in k for k in report.skipped) and any("unreadable" in k for k in report.skipped)
    assert Path(rows[0].images[0]).is_absolute()  # later loads do not depend on the working directory

    table = pa.Table.from_pylist([  # HF datasets layout: images as {bytes, path} structs, parts with null keys
        {"id": "a", "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                          {"type": "text", "text": "Colour?"}]}],
         "ground_truth": "red", "images": [{"bytes": _png(), "path": None}]},
        {"id": "b", "prompt": [{"role": "user", "content": [{"type": "image", "text": None},
                                                          {"type": "text", "text": "Colour?"}]}],
         "ground_truth": "red", "images": [{"bytes": b"garbage", "path": None}]},
    ])
    pq.write_table(table, tmp_path / "rows.parquet")
    report = LoadReport()
    rows = load_rows([str(tmp_path / "rows.parquet")], report)
    assert [r.prompt_id for r in rows] == ["a"] and sum(report.skipped.values()) == 1


def test_vl_image_refs_match_parts_in_order():
    from PIL import Image

    pil = Image.new("RGB", (40, 40), (0, 0, 255))
    row = PromptRow("r", [{"role": "user", "content": [
        {"type": "image", "image": pil}, {"type": "text", "text": "and"}, {"type": "image"}]}], images=[_png()])
    messages, refs = image_refs(row)
    assert refs[0] is pil and refs[1] == row.images[0]
    assert all(set(p) == {"type"} for p in messages[0]["content"] if p["type"] == "image")
    with pytest.raises(ImageError, match="images in the row but only"):
        image_refs(PromptRow("r", [{"role": "user", "content": "no image part"}], images=[_png()]))
    assert load_image({"bytes": _png(), "path": None}).size == (64, 64)
    with pytest.raises(ImageError, match="does not exist"):
        load_image("/nowhere/at/all.png")


# ---- prompts -----------------------------------------------------------------------------------

def test_vl_prompt_has_one_token_per_merged_patch(encoder):
    import numpy as np

    text_row = PromptRow("t", [{"role": "user", "content": "What colour?"}])
    base = len(encoder.encode(text_row)[0].prompt_ids)
    for size in [(32, 32), (128, 128), (64, 160), (300, 40)]:
        row = PromptRow("r", _parts(), images=[_png(size=size)])
        prompt, mm = encoder.encode(row)
        t, h, w = mm["image_grid_thw"][0]
        vision = int(t * h * w) // 4
        assert len(prompt.prompt_ids) == base + vision + 2  # + <|vision_start|>, <|vision_end|>
        assert mm["pixel_values"].shape == (int(t * h * w), 3 * 2 * 16 * 16) and mm["pixel_values"].dtype == np.float32
        assert prompt.multi_modal_data["image"][0].mode == "RGB"
    marker = PromptRow("m", [{"role": "user", "content": "<image>What colour?"}], images=[_png()])
    parts = PromptRow("p", _parts(), images=[_png()])
    assert encoder.encode(marker)[0].prompt_ids == encoder.encode(parts)[0].prompt_ids
    two = PromptRow("2", _parts(images=2), images=[_png(), _png(size=(96, 32))])
    two_prompt, two_mm = encoder.encode(two)
    assert two_mm["image_grid_thw"].shape == (2, 3)
    pad = encoder.stop_token_ids[0]
    collapsed = collapse_image_slots(two_prompt.prompt_ids, pad)  # what vLLM is sent: one slot per image
    assert collapsed.count(pad) == 2 and len(two_prompt.prompt_ids) - len(collapsed) == two_prompt.prompt_ids.count(pad) - 2
    three = PromptRow("3", _parts(images=3), images=[_png()] * 3)
    with pytest.raises(ImageError, match="max_images_per_prompt=2"):
        encoder.encode(three)
    assert encoder.stop_token_ids == [encoder.tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]


def test_vl_text_model_refuses_image_rows(tiny_path):
    text = PromptEncoder.from_model(tiny_path, max_images=1)
    assert text.processor is None and text.stop_token_ids == []
    with pytest.raises(ImageError, match="has images"):
        text.encode(PromptRow("r", _parts(), images=[_png()]))
    with pytest.raises(ImageError):
        encode_text_prompt(PromptRow("r", [{"role": "user", "content": "<image> hi"}], images=[_png()]), text.tokenizer)


# ---- the generated task and rewards ------------------------------------------------------------

def test_vl_colours_task_and_reward():
    from verl_async.data.tasks import COLOURS, generate_task
    from verl_async.rewards import resolve_reward

    rows = generate_task("colours", 30, seed=3)
    assert rows == generate_task("colours", 30, seed=3)
    sizes = set()
    for row in rows:
        image = load_image(row.images[0])
        assert image.getpixel((0, 0)) == COLOURS[row.ground_truth]
        sizes.add(image.size)
    assert len(sizes) > 5
    reward = resolve_reward("colours")
    assert reward("It is red, not blue.", "red", {}) == 1.0
    assert reward("blue", "red", {}) == 0.25 and reward("no idea", "red", {}) == 0.0


@pytest.mark.parametrize("response, truth, want", [
    ("... so x = \\boxed{2\\sqrt{3}}", "2\\sqrt{3}", 1.0),
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", 1.0),
    ("The answer is \\boxed{\\frac{3}{2}}", "1.5", 1.0),
    ("the angle is 45", "45", 1.0),
    ("\\boxed{44}", "45", 0.0),
    ("", "45", 0.0),
])
def test_vl_geometry_reward(response, truth, want):
    from verl_async.rewards import resolve_reward

    assert resolve_reward("geometry")(response, truth, {}) == want


# ---- verl-async-prepare ------------------------------------------------------------------------

def _write_arrow_split(folder: Path, records: list[dict]) -> None:
    """The layout datasets' save_to_disk writes: state.json + arrow stream files."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(records)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    (folder / "dataset_info.json").write_text("{}")


def test_vl_prepare_geo3k_from_save_to_disk_layout(tmp_path, encoder):
    from verl_async.data.prepare import main

    src = tmp_path / "geometry3k"
    image = {"bytes": _png((10, 200, 10), (120, 90)), "path": "q.png"}
    _write_arrow_split(src / "train", [
        {"images": [image], "problem": "<image>Find x. Round to the nearest tenth.", "answer": "2\\sqrt{3}"},
        {"images": [image], "problem": "In the figure, find the area.", "answer": "12"},  # no marker: image first
        {"images": [{"bytes": b"broken", "path": None}], "problem": "<image>Find y.", "answer": "3"},
    ])
    _write_arrow_split(src / "test", [{"images": [image], "problem": "<image>Find z.", "answer": "4.5"}])
    (src / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    main(["geo3k", "--src", str(src), "--out", str(tmp_path / "rows")])

    report = LoadReport()
    rows = load_rows([str(tmp_path / "rows" / "train.parquet")], report)
    assert [r.ground_truth for r in rows] == ["2\\sqrt{3}", "12"] and report.skipped == {}
    assert rows[0].data_source == "geo3k" and rows[0].extra_info == {"split": "train", "index": 0}
    prompt, mm = encoder.encode(rows[1])
    assert mm["image_grid_thw"].shape == (1, 3) and len(prompt.prompt_ids) > 20
    assert len(load_rows([str(tmp_path / "rows" / "test.parquet")])) == 1


def test_vl_prepare_gsm8k_from_hub_parquet_layout(tmp_path, tiny_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from verl_async.data.prepare import prepare
    from verl_async.rewards import resolve_reward

    (tmp_path / "gsm8k" / "main").mkdir(parents=True)
    recs = [{"question": "Tom has 3 apples and buys 1,200 more. How many?", "answer": "3 + 1200 = 1203\n#### 1,203"},
            {"question": "No final line?", "answer": "42"}]
    pq.write_table(pa.Table.from_pylist(recs), tmp_path / "gsm8k" / "main" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(recs[:1]), tmp_path / "gsm8k" / "main" / "test-00000-of-00001.parquet")
    reports = prepare("gsm8k", str(tmp_path / "gsm8k"), str(tmp_path / "rows"))
    assert reports["train"].loaded == 1 and sum(reports["train"].skipped.values()) == 1
    (row,) = load_rows([str(tmp_path / "rows" / "train.parquet")])
    assert row.ground_truth == "1203" and row.images == []
    assert resolve_reward("gsm8k")("so the total is #### 1203", row.ground_truth, row.extra_info) == 1.0
    from transformers import AutoTokenizer

    assert len(encode_text_prompt(row, AutoTokenizer.from_pretrained(tiny_path)).prompt_ids) > 10


# ---- trainer-side helpers ----------------------------------------------------------------------

def test_vl_freeze_vision_tower_keeps_it_out_of_training_and_sync(vl_path, tiny_path):
    import torch

    from verl_async.config.model import ModelConfig
    from verl_async.sync.names import sync_tensor_metas
    from verl_async.training.model import build_model

    model = build_model(vl_path, ModelConfig(path=vl_path, freeze_vision_tower=True), torch.device("cpu"),
                        fsdp=False, trainable=True)
    names = {n: p.requires_grad for n, p in model.named_parameters()}
    assert not any(g for n, g in names.items() if n.startswith("model.visual."))
    assert all(g for n, g in names.items() if not n.startswith("model.visual."))
    metas = sync_tensor_metas(model.named_parameters(), tied=True, skip_frozen=True)
    assert metas and not any(m.name.startswith("model.visual.") for m in metas)
    with pytest.raises(ValueError, match="no .* parameters"):
        build_model(tiny_path, ModelConfig(path=tiny_path, freeze_vision_tower=True), torch.device("cpu"),
                    fsdp=False, trainable=True)


def test_vl_micro_batches_feed_generated_pad_as_padding_and_dummy_runs_vision(encoder, vl_path):
    from transformers import AutoConfig

    from verl_async.training.batching import dummy_micro_batch, make_micro_batches
    from verl_async.training.model import vision_token_inputs
    from verl_async.types import TrainRow

    config = AutoConfig.from_pretrained(vl_path)
    pad_token = config.image_token_id
    rows = []
    for size in [(64, 64), (32, 96)]:
        prompt, mm = encoder.encode(PromptRow("r", _parts(), images=[_png(size=size)]))
        response = [40, 41, pad_token]  # a generation stopped at a sampled <|image_pad|>
        rows.append(TrainRow(prompt.prompt_ids, response, [0.0] * 3, [1] * 3, 1.0, [0] * 3, mm))
    (mb,) = make_micro_batches(rows, [0, 1], 4096, pad_id=0)
    assert not mb.packed and mb.extra_inputs["image_grid_thw"].shape == (2, 3)
    extra = vision_token_inputs(config, mb)
    in_prompts = sum(int(t * h * w) // 4 for t, h, w in mb.extra_inputs["image_grid_thw"].tolist())
    assert int((extra["mm_token_type_ids"] == 1).sum()) == in_prompts  # only the prompts' slots
    assert mb.targets.tolist().count(pad_token) == 2  # still trained on as a token of the response
    dummy = dummy_micro_batch(0, like=rows[0])
    assert dummy.row_ids == [] and float(dummy.loss_mask.sum()) == 0 and "pixel_values" in dummy.extra_inputs


# ---- the rollouter's VL path (fake server, no engine) --------------------------------------------

class _Remote:
    """An actor method stand-in: `.remote(...)` is the coroutine function."""

    def __init__(self, fn):
        self.remote = fn


class _FakeServer:
    """Answers every request with 'red' + EOS; records what it was sent."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.requests = []
        self.generate, self.stats = _Remote(self._generate), _Remote(self._stats)

    async def _generate(self, request_id, prompt, budget, sampling):
        from verl_async.types import FinishReason, Generation

        self.requests.append((prompt, sampling))
        ids = self.tokenizer.encode(" red", add_special_tokens=False) + [self.tokenizer.eos_token_id]
        return Generation(request_id, prompt.prompt_ids, ids, [-1.0] * len(ids), [0] * len(ids), FinishReason.STOP)

    async def _stats(self):
        return {}


class _LocalQueue:
    """The real SampleQueue, called the way the rollouter calls the actor (`method.remote(...)`)."""

    def __init__(self):
        from verl_async.pipeline.queue import SampleQueue

        self.queue = SampleQueue(capacity=4)
        self.put, self.wait_for_room = _Remote(self.queue.put), _Remote(self.queue.wait_for_room)

    @property
    def groups(self):
        return self.queue.snapshot()


def test_vl_rollouter_carries_processor_outputs_and_counts_image_skips(tmp_path, vl_path, encoder):
    from verl_async.config import AlgorithmConfig, DataConfig, PipelineConfig, RolloutConfig
    from verl_async.pipeline.rollouter import Rollouter
    from verl_async.rollout.server import ServerInfo

    for name, rgb in (("red", (220, 30, 30)), ("gone", (0, 0, 0))):
        (tmp_path / f"{name}.png").write_bytes(_png(rgb))
    recs = [{"id": "red", "prompt": _parts(), "ground_truth": "red", "images": ["red.png"]},
            {"id": "missing", "prompt": _parts(), "ground_truth": "red", "images": ["absent.png"]},
            {"id": "gone", "prompt": _parts(), "ground_truth": "black", "images": ["gone.png"]}]
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    data = DataConfig(train_files=[str(tmp_path / "rows.jsonl")], reward_fn="colours", shuffle=False)
    server, queue = _FakeServer(encoder.tokenizer), _LocalQueue()

    async def scenario():
        r = Rollouter([server], [ServerInfo(0, 4096, 1, "fake")], vl_path, RolloutConfig(n=2), data,
                      PipelineConfig(batch_groups=1, max_staleness=0, max_inflight_groups=1),
                      AlgorithmConfig(drop_zero_variance_groups=False), queue)
        (tmp_path / "gone.png").unlink()  # loaded fine, then lost before its prompt was built
        await r._rollout_group(r.source.next(), "g0")
        await r._rollout_group(r.source.next(), "g1")
        return r, await r.pop_metrics()

    rollouter, metrics = asyncio.run(scenario())
    assert metrics["data/rows_skipped"] == 1  # the missing file, at load
    assert metrics["rollout/image_errors"] == 1 and rollouter.counts.rejected == 1  # the lost file, at build time
    (group,) = queue.groups
    assert [s.reward for s in group.samples] == [1.0, 1.0]
    mm = group.samples[0].multi_modal_data
    assert set(mm) == {"pixel_values", "image_grid_thw"} and mm["image_grid_thw"].tolist() == [[1, 4, 4]]
    prompt, sampling = server.requests[0]
    assert prompt.multi_modal_data["image"][0].size == (64, 64)
    assert sampling == {"stop_token_ids": encoder.stop_token_ids}
    assert len(server.requests) == 2  # the lost image never reached the server image-less


def test_vl_png_helper_roundtrip():
    from PIL import Image

    assert Image.open(io.BytesIO(_png((1, 2, 3)))).getpixel((5, 5)) == (1, 2, 3)
