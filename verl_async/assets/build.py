"""Build the tiny assets deterministically from a seed into a cache folder.

tiny:    2-layer Qwen3, random weights, tied embeddings, locally trained tokenizer.
counter: Qwen3-shaped, untied; decoder layers are identities (o_proj = down_proj = 0) and
         lm_head row j = embedding row (j - STEP) mod V, so greedy output is prev + STEP.
"""

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

VOCAB_SIZE = 1024  # model vocab (tokenizer has fewer entries; the rest are unused rows)


def asset_dir(assets_dir: str, kind: str, step: int = 1) -> Path:
    name = f"{kind}-step{step}" if kind == "counter" else kind
    return Path(os.path.expanduser(assets_dir)) / name


def ensure_asset(assets_dir: str, kind: str, seed: int = 0, step: int = 1) -> Path:
    """Return the folder of asset `kind`, building it first if it is missing."""
    out = asset_dir(assets_dir, kind, step)
    if (out / "config.json").exists():
        return out
    builders = {"tiny": build_tiny, "counter": lambda o, s: build_counter(o, s, step)}
    if kind == "tiny-vl":
        from verl_async.assets.vl import build_tiny_vl
        builders["tiny-vl"] = build_tiny_vl
    if kind not in builders:
        raise ValueError(f"unknown asset kind {kind!r}: use one of tiny, counter, tiny-vl")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    builders[kind](tmp, seed)
    if not out.exists():
        tmp.rename(out)
    logger.info("built asset %s at %s", kind, out)
    return out


def _save_tokenizer(out: Path, seed: int):
    from verl_async.assets.tokenizer import train_tokenizer

    tok = train_tokenizer(seed)
    tok.save_pretrained(out)
    return tok


def qwen3_config(tok, *, hidden: int, layers: int, tied: bool, **kw):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=kw.pop("intermediate", 2 * hidden),
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=tied,
        bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        dtype="float32", **kw,
    )


def _save_model(model, tok, out: Path) -> None:
    from transformers import GenerationConfig

    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)


def build_tiny(out: Path, seed: int) -> None:
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = _save_tokenizer(out, seed)
    model = Qwen3ForCausalLM(qwen3_config(tok, hidden=128, layers=2, tied=True))
    _save_model(model, tok, out)


def counter_weights(model, step: int, seed: int) -> None:
    """Make `model` (Qwen3ForCausalLM, untied) a counter: greedy next token = prev + step (mod V)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = torch.randn(model.config.vocab_size, model.config.hidden_size, generator=g)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        model.model.embed_tokens.weight.copy_(emb)
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.copy_(torch.roll(emb, shifts=step, dims=0))  # row j = emb[j - step]


def build_counter(out: Path, seed: int, step: int) -> None:
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = _save_tokenizer(out, seed)
    model = Qwen3ForCausalLM(qwen3_config(tok, hidden=256, layers=2, tied=False))
    counter_weights(model, step, seed)
    _save_model(model, tok, out)
    (out / "counter.json").write_text(json.dumps({"step": step, "vocab_size": VOCAB_SIZE}))


def resolve_model_path(path: str, assets_dir: str, seed: int = 0) -> str:
    """model.path as a folder: an asset name is built on first use, anything else must exist."""
    if path in ("tiny", "counter", "tiny-vl"):
        return str(ensure_asset(assets_dir, path, seed=seed))
    folder = Path(os.path.expanduser(path))
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"model.path={path!r} is not a model folder (no config.json). Point it at a local HF folder, "
            "or use an asset name: tiny, counter, tiny-vl (nothing is downloaded).")
    return str(folder)
