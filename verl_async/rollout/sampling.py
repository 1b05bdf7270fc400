"""Generation budget and vLLM sampling params: pure functions, unit-tested without an engine.

The budget rule (LESSONS.md, "Generation budget"): a request gets what it asked for (or the
configured response_length), never the whole remaining context window by default, and never
more than the window allows.
"""

from typing import Any

# Per-request overrides the builder accepts (the `sampling` dict of RolloutServer.generate).
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed", "ignore_eos", "max_tokens",
                 "max_new_tokens", "min_tokens", "stop_token_ids")


class PromptTooLongError(ValueError):
    """A prompt leaves no room for even one response token in the engine's context window."""

    def __init__(self, prompt_id: str, prompt_len: int, max_model_len: int):
        self.prompt_id = prompt_id
        self.prompt_len = prompt_len
        self.max_model_len = max_model_len
        super().__init__(
            f"prompt {prompt_id!r} has {prompt_len} tokens (vision tokens included), but the engine's "
            f"max_model_len is {max_model_len}: no room for a response token. Filter prompts with "
            f"data.max_prompt_length < {max_model_len}, or raise rollout.max_model_len "
            f"(with `auto` the engine fits it to the KV memory: give it more KV cache).")

    def __reduce__(self):  # keep the fields when the error crosses a Ray boundary
        return (type(self), (self.prompt_id, self.prompt_len, self.max_model_len))


def clamp_max_tokens(prompt_len: int, max_model_len: int, response_length: int,
                     max_tokens: int | None = None, max_new_tokens: int | None = None,
                     already_generated: int = 0, prompt_id: str = "") -> int:
    """The number of tokens a request may generate.

        budget = max_tokens if given, else max_new_tokens if given, else response_length
        result = min(budget - already_generated, max_model_len - prompt_len)

    prompt_len is the length of what is sent to the engine (vision tokens included; for a
    resubmitted request, the original prompt plus the tokens it already generated), and
    already_generated is what a resumed request already produced against its budget.
    Raises PromptTooLongError when the window leaves no room for one token, ValueError for
    a negative budget. Returns 0 when a resumed request's budget is already spent.
    """
    if prompt_len < 0 or already_generated < 0:
        raise ValueError(f"prompt_len={prompt_len} and already_generated={already_generated} must be >= 0")
    budget = max_tokens if max_tokens is not None else (
        max_new_tokens if max_new_tokens is not None else response_length)
    if budget < 0:
        raise ValueError(f"max_tokens={budget} is negative: ask for 1 or more tokens.")
    window = max_model_len - prompt_len
    if window < 1:
        raise PromptTooLongError(prompt_id, prompt_len, max_model_len)
    return max(0, min(budget - already_generated, window))


def sampling_params(rollout, max_tokens: int, sampling: dict[str, Any] | None = None):
    """vLLM SamplingParams from the rollout defaults (a RolloutConfig) plus per-request overrides.

    Always: logprobs=0 (the sampled token's logprob only), detokenize=False (token-in,
    token-out), DELTA streaming (the server counts tokens as they arrive).
    """
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    overrides = dict(sampling or {})
    unknown = set(overrides) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"unknown sampling override(s) {sorted(unknown)}: use {', '.join(SAMPLING_KEYS)}.")
    overrides.pop("max_tokens", None)  # both already folded into `max_tokens` by clamp_max_tokens
    overrides.pop("max_new_tokens", None)
    params = dict(temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k)
    params.update(overrides)
    return SamplingParams(max_tokens=max_tokens, logprobs=0, detokenize=False,
                          output_kind=RequestOutputKind.DELTA, **params)
