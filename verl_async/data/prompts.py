"""Turn a PromptRow into what the engine receives, with the real prompt length.

Text: the chat template rendered to text, then encoded (the same on every transformers
version). VL models: the model's own processor (verl_async/data/vision.py) renders the
template and inserts the vision tokens, and its outputs for the trainer travel with the sample.
A row with images for a text-only model is an ImageError, never an image-less prompt.
"""

from typing import Any

from verl_async.data.vision import (
    ImageError,
    encode_vl_prompt,
    has_images,
    is_vl_model,
    vision_pad_ids,
)
from verl_async.types import EnginePrompt, PromptRow


def encode_text_prompt(row: PromptRow, tokenizer) -> EnginePrompt:
    if has_images(row):
        raise ImageError(f"row {row.prompt_id} has images: build it with PromptEncoder on a VL model "
                         "(the model's processor inserts the vision tokens)")
    text = tokenizer.apply_chat_template(row.messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return EnginePrompt(prompt_ids=list(ids))


class PromptEncoder:
    """Row -> (EnginePrompt, processor outputs the trainer needs: {} for text prompts).

    `processor` is the model's HF processor (VL models) or None (text models). ImageError
    (a ValueError) for a row whose images are missing, unreadable or too many.
    """

    def __init__(self, tokenizer, processor=None, max_images: int = 1):
        self.tokenizer = tokenizer
        self.processor = processor
        self.max_images = max_images

    @classmethod
    def from_model(cls, model_path: str, max_images: int) -> "PromptEncoder":
        from transformers import AutoProcessor, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        processor = AutoProcessor.from_pretrained(model_path) if is_vl_model(model_path) else None
        return cls(tokenizer, processor, max_images)

    @property
    def stop_token_ids(self) -> list[int]:
        """Extra stop tokens for every request: the vision pad tokens on a VL model."""
        return vision_pad_ids(self.tokenizer) if self.processor is not None else []

    def encode(self, row: PromptRow) -> tuple[EnginePrompt, dict[str, Any]]:
        if self.processor is None:
            return encode_text_prompt(row, self.tokenizer), {}
        return encode_vl_prompt(row, self.processor, self.max_images)
