"""Build a Qwen3-shaped model with random weights and the local tiny tokenizer (no download).

For GPU runs of the whole pipeline where no real checkpoint is available:
    python3 benchmarks/build_gpu_model.py --shape 0.6B --out /tmp/qwen3-0.6b-random
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, tied embeddings (as the released Qwen3 models)
    "0.6B": (1024, 28, 16, 8, 3072, True),
    "1.7B": (2048, 28, 16, 8, 6144, True),
    "4B": (2560, 36, 32, 8, 9728, True),
    "8B": (4096, 36, 32, 8, 12288, False),
}


def qwen3_config(shape: str, tokenizer):
    from transformers import Qwen3Config

    hidden, layers, heads, kv, inter, tied = SHAPES[shape]
    return Qwen3Config(vocab_size=151936, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, max_position_embeddings=8192,
                       tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id, dtype="bfloat16")


def build(shape: str, out: str) -> str:
    """Random bf16 weights (seed 0) in an HF folder with the local tokenizer; returns `out`."""
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    from verl_async.assets.tokenizer import train_tokenizer

    tok = train_tokenizer(seed=0)
    tok.save_pretrained(out)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(qwen3_config(shape, tok)).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(out)
    del model
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="0.6B", choices=sorted(SHAPES))
    p.add_argument("--out", required=True)
    args = p.parse_args()
    build(args.shape, args.out)


if __name__ == "__main__":
    main()
