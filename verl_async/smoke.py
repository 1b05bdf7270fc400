"""Smoke job: start one vLLM engine on the configured model, generate a few samples, log them."""

import logging

from verl_async.config import JobConfig

logger = logging.getLogger(__name__)


def run_smoke(job: JobConfig, device: str, num_prompts: int = 4) -> dict[str, float]:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from verl_async.assets.build import resolve_model_path
    from verl_async.data.prompts import encode_text_prompt
    from verl_async.data.source import make_source
    from verl_async.rewards import resolve_reward

    path = resolve_model_path(job.model.path, job.model.assets_dir)
    if job.data.env.enabled:
        logger.info("smoke: one model turn per prompt; the environment %s is not run", job.data.env.name)
    tok = AutoTokenizer.from_pretrained(path)
    source = make_source(job.data)
    reward_fn = resolve_reward(job.data.reward_fn)
    max_len = job.rollout.max_model_len_or_auto
    llm = LLM(path, dtype=job.model.dtype, enforce_eager=job.rollout.enforce_eager or device == "cpu",
              kv_cache_memory_bytes=job.rollout.kv_cache_memory_bytes or None, max_model_len=max_len,
              seed=job.rollout.seed)
    rows = [source.next() for _ in range(num_prompts)]
    prompts = [{"prompt_token_ids": encode_text_prompt(r, tok).prompt_ids} for r in rows]
    params = SamplingParams(max_tokens=job.rollout.response_length, temperature=job.rollout.temperature, logprobs=0)
    rewards = []
    for row, out in zip(rows, llm.generate(prompts, params), strict=True):
        text = out.outputs[0].text
        rewards.append(reward_fn(text, row.ground_truth, row.extra_info))
        logger.info("[%s] %r -> %r (reward %.2f, finish %s)", row.prompt_id, row.messages[-1]["content"], text,
                    rewards[-1], out.outputs[0].finish_reason)
    return {"rollout/reward_mean": sum(rewards) / len(rewards)}
