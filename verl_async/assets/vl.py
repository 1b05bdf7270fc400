"""Build a Qwen3-VL model folder from a config with random weights (nothing is downloaded).

tiny-vl: text 2 layers x hidden 128 (tied embeddings, like Qwen3-VL-2B/4B), vision tower depth 2 x
hidden 64 with Qwen3-VL's patch 16 / merge 2 / temporal patch 2, deepstack into the first text layer
(deepstack adds to image positions only, so into the last layer it would reach no response token);
the tiny tokenizer (it already holds the four vision special tokens) and a saved Qwen3VLProcessor
whose images are resized to 32..256 px a side, so a 128x128 image is 16 vision tokens.
`qwen3_vl_config(shape="2b"|"4b"|"8b")` gives the real models' layer shapes (GPU benchmarks).
"""

import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PATCH, MERGE, TEMPORAL = 16, 2, 2
PIXELS_PER_TOKEN = (PATCH * MERGE) ** 2  # one vision token covers a 32x32 pixel square

# Published layer shapes of Qwen3-VL (text: hidden, layers, heads, kv heads, mlp; vision: depth,
# hidden, mlp, heads, deepstack block indexes). Vocabulary and token ids come from our tokenizer.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=2, head_dim=32, mlp=256, tied=True,
                 v_depth=2, v_hidden=64, v_mlp=128, v_heads=4, deepstack=[0], pos_embeddings=64,
                 vocab=1024, mrope=[6, 5, 5]),
    "2b": dict(hidden=2048, layers=28, heads=16, kv_heads=8, head_dim=128, mlp=6144, tied=True,
               v_depth=24, v_hidden=1024, v_mlp=4096, v_heads=16, deepstack=[5, 11, 17], pos_embeddings=2304,
               vocab=151936, mrope=[24, 20, 20]),
    "4b": dict(hidden=2560, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=9728, tied=True,
               v_depth=24, v_hidden=1024, v_mlp=4096, v_heads=16, deepstack=[5, 11, 17], pos_embeddings=2304,
               vocab=151936, mrope=[24, 20, 20]),
    "8b": dict(hidden=4096, layers=36, heads=32, kv_heads=8, head_dim=128, mlp=12288, tied=False,
               v_depth=27, v_hidden=1152, v_mlp=4304, v_heads=16, deepstack=[8, 16, 24], pos_embeddings=2304,
               vocab=151936, mrope=[24, 20, 20]),
}


def qwen3_vl_config(tok, shape: str = "tiny", dtype: str = "float32"):
    """A Qwen3VLConfig of `shape` whose special token ids are those of tokenizer `tok`."""
    from transformers import Qwen3VLConfig

    s = SHAPES[shape]
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
        max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=s["tied"],
        rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": s["mrope"],
                         "mrope_interleaved": True},
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        depth=s["v_depth"], hidden_size=s["v_hidden"], intermediate_size=s["v_mlp"], num_heads=s["v_heads"],
        patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, out_hidden_size=s["hidden"],
        num_position_embeddings=s["pos_embeddings"], deepstack_visual_indexes=s["deepstack"],
        hidden_act="gelu_pytorch_tanh", in_channels=3,
    )
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=s["tied"],
                         architectures=["Qwen3VLForConditionalGeneration"], dtype=dtype, **ids)


def make_processor(tok, min_side: int = 32, max_side: int = 256):
    """A Qwen3VLProcessor around `tok`: images resized so each side is a multiple of 32 px and the
    area stays within [min_side^2, max_side^2] (Qwen's smart_resize)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    size = {"shortest_edge": min_side * min_side, "longest_edge": max_side * max_side}
    common = dict(patch_size=PATCH, temporal_patch_size=TEMPORAL, merge_size=MERGE, size=size)
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**common),
                            video_processor=Qwen3VLVideoProcessor(**common),
                            tokenizer=tok, chat_template=tok.chat_template)


def build_vl(out: Path, seed: int, shape: str = "tiny", dtype: str = "float32", device: str = "cpu") -> None:
    """Write an HF folder: Qwen3VLForConditionalGeneration (random init from `seed`), tokenizer, processor."""
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    from verl_async.assets.tokenizer import train_tokenizer

    torch.manual_seed(seed)
    tok = train_tokenizer(seed)
    config = qwen3_vl_config(tok, shape, dtype)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(config).to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    make_processor(tok).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)
    logger.info("built Qwen3-VL (%s shape, %.1fM parameters) at %s", shape,
                sum(p.numel() for p in model.parameters()) / 1e6, out)


def build_tiny_vl(out: Path, seed: int) -> None:
    build_vl(out, seed, "tiny")
