"""Images in prompt rows: where they sit in the messages, loading them, and VL prompt building.

A row's images are given either inline in a message part ({type: image, image: REF}) or in
`PromptRow.images`, taken in order by the image parts that carry none (a verl-style "<image>"
marker inside a text is such a part too). REF is a file path, bytes, a PIL image, or the
HF datasets layout {bytes, path}. A row whose images cannot be matched or read raises
ImageError: callers count it as a skip, it never becomes an image-less prompt.
"""

import io
import json
import logging
from pathlib import Path
from typing import Any

from verl_async.types import EnginePrompt, PromptRow

logger = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"  # verl / geo3k convention for an image inside a text
VISION_PAD_TOKENS = ("<|image_pad|>", "<|video_pad|>")  # generated, they would be read as image slots


class ImageError(ValueError):
    """A row's images are missing, unreadable, or do not match its image parts."""


def is_vl_model(model_path: str) -> bool:
    """Whether the HF folder's config has a vision tower (False when there is no config.json)."""
    path = Path(model_path) / "config.json"
    return path.exists() and "vision_config" in json.loads(path.read_text())


def _is_image_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def split_markers(text: str) -> list[dict[str, Any]]:
    """'a <image> b' -> [text a, image, text b] (empty texts dropped)."""
    parts: list[dict[str, Any]] = []
    for i, chunk in enumerate(text.split(IMAGE_MARKER)):
        if i:
            parts.append({"type": "image"})
        if chunk:
            parts.append({"type": "text", "text": chunk})
    return parts


def message_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages with list content: markers split into image parts, None-valued keys dropped
    (parquet gives every part every key)."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts = split_markers(content) if IMAGE_MARKER in content else [{"type": "text", "text": content}]
        else:
            parts = []
            for p in content or []:
                p = {k: v for k, v in p.items() if v is not None}
                parts += split_markers(p["text"]) if p.get("type") == "text" and IMAGE_MARKER in p["text"] else [p]
        out.append({**m, "content": parts})
    return out


def has_images(row: PromptRow) -> bool:
    if row.images:
        return True
    for m in row.messages:
        content = m.get("content")
        if isinstance(content, str) and IMAGE_MARKER in content:
            return True
        if isinstance(content, list) and any(_is_image_part(p) for p in content):
            return True
    return False


def image_refs(row: PromptRow) -> tuple[list[dict[str, Any]], list[Any]]:
    """(messages with image parts stripped of their payload, the image references in prompt order)."""
    messages = message_parts(row.messages)
    pool = list(row.images)
    refs: list[Any] = []
    for m in messages:
        for i, part in enumerate(m["content"]):
            if not _is_image_part(part):
                continue
            if "image" in part:
                refs.append(part["image"])
            elif pool:
                refs.append(pool.pop(0))
            else:
                raise ImageError(f"{sum(_is_image_part(p) for mm in messages for p in mm['content'])} image parts "
                                 f"but only {len(row.images)} images in the row")
            m["content"][i] = {"type": "image"}
    if pool:
        raise ImageError(f"{len(row.images)} images in the row but only {len(refs)} image parts in its messages")
    return messages, refs


def _open(ref: Any, base_dir: Path | None):
    from PIL import Image

    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict):  # HF datasets Image feature: {bytes, path}
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, bytes | bytearray):
        return Image.open(io.BytesIO(ref))
    if isinstance(ref, str):
        path = Path(ref).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.exists():
            raise ImageError(f"image file {path} does not exist")
        return Image.open(path)
    raise ImageError(f"unsupported image reference of type {type(ref).__name__}: use a path, bytes or PIL image")


def load_image(ref: Any, base_dir: Path | None = None):
    """The image as an RGB PIL image; ImageError if it is missing or cannot be decoded."""
    from PIL import UnidentifiedImageError

    try:
        image = _open(ref, base_dir)
        image.load()
    except ImageError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise ImageError(f"unreadable image ({type(e).__name__}: {e})") from e
    return image if image.mode == "RGB" else image.convert("RGB")


def check_row_images(row: PromptRow, base_dir: Path | None = None) -> None:
    """At load time: images match the image parts, and every file exists and has a valid header
    (a cheap check; a full decode happens when the prompt is built). Relative paths are made
    absolute against base_dir, so later loads do not depend on the working directory."""
    from PIL import Image, UnidentifiedImageError

    _, refs = image_refs(row)
    for ref in refs:
        try:
            image = _open(ref, base_dir)
            if not isinstance(ref, Image.Image):
                image.verify()
        except ImageError:
            raise
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise ImageError(f"unreadable image ({type(e).__name__}: {e})") from e
    if base_dir is None:
        return

    def absolute(ref: Any) -> Any:
        return str(base_dir / ref) if isinstance(ref, str) and not Path(ref).expanduser().is_absolute() else ref

    row.images = [absolute(r) for r in row.images]
    for m in row.messages:
        for part in m["content"] if isinstance(m.get("content"), list) else []:
            if _is_image_part(part) and "image" in part:
                part["image"] = absolute(part["image"])


def encode_vl_prompt(row: PromptRow, processor, max_images: int) -> tuple[EnginePrompt, dict[str, Any]]:
    """The model's processor renders the chat template and inserts one <|image_pad|> per merged
    patch, so len(prompt_ids) is what the engine will count. Returns the engine prompt (raw
    images for vLLM) and the processor outputs the trainer's forward needs (numpy arrays)."""
    messages, refs = image_refs(row)
    if len(refs) > max_images:
        raise ImageError(f"{len(refs)} images in one prompt exceed data.max_images_per_prompt={max_images}")
    images = [load_image(r) for r in refs]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[text], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    if not images:
        return EnginePrompt(prompt_ids=ids), {}
    mm = {"pixel_values": enc["pixel_values"].float().numpy(), "image_grid_thw": enc["image_grid_thw"].numpy()}
    return EnginePrompt(prompt_ids=ids, multi_modal_data={"image": images}), mm


def collapse_image_slots(ids: list[int], image_token_id: int | None) -> list[int]:
    """Each run of image slots (<|image_pad|> x N, as the HF processor expands it) -> one slot: the
    form vLLM takes with token-id prompts; it expands every slot again from the image (vLLM 0.26 and
    0.32 never detect an already expanded prompt, so sending ours would add N - 1 slots per image)."""
    if image_token_id is None:
        return list(ids)
    return [t for k, t in enumerate(ids) if t != image_token_id or k == 0 or ids[k - 1] != image_token_id]


def solid_png(rgb: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    """A PNG of one colour (the generated colour task's images)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format="PNG")
    return buf.getvalue()


def vision_pad_ids(tokenizer) -> list[int]:
    """Token ids that mark image/video slots: a generation that samples one is stopped there (the
    trainer's forward would otherwise read it as a slot for an image the prompt does not have)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in VISION_PAD_TOKENS]
    return [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id]
