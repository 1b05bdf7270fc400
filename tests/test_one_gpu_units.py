"""Unit tests of the one-GPU pieces (no engine, no Ray): the trainer memory estimate and check,
the placement plan and cluster fit check, backend resolution and config checks, the IPC payloads
(both vLLM versions' layouts) and the IPC sender's bucket hand-over, driven with CPU tensors."""

import asyncio
import base64
import pickle

import pytest
import torch
from hydra import compose, initialize_config_dir
from pipeline_runs import CONFIGS

from verl_async.config import ConfigError, SyncConfig, register, to_job_config
from verl_async.pipeline.resources import RoleRequest, plan_placement, shortfalls
from verl_async.sync import compat
from verl_async.sync.engine_side import resolve_backend
from verl_async.training import memory
from verl_async.types import TensorMeta

register()
GPU_1X1 = ["rollout=gpu", "trainer=gpu", "cluster=gpu_1x1"]


def job(*overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return to_job_config(compose(config_name="config", overrides=list(overrides)))


# ---- memory estimate and check ----------------------------------------------------------------

SHAPE = memory.ModelShape(params=1000, trainable_params=1000, layers=2, hidden=8, q_dim=8, kv_dim=4,
                          intermediate=16, vocab=32)


def test_estimate_counts_states_activations_logits():
    m = memory.estimate_trainer_memory(SHAPE, compute_dtype="bfloat16", micro_batch_tokens=10,
                                       gradient_checkpointing=False, reference_model=False, staging_bytes=64)
    assert m.states == 1000 * (16 + 2)  # fp32 weights, grads, AdamW m and v, bf16 compute copy
    layer = 2 * (4 * 8 + 2 * 8) + 6 * (8 + 4) + 2 * (7 * 8 + 4 * 4) + 2 * 4 * 16
    assert memory.layer_activation_bytes(SHAPE, 2) == layer
    workspace = memory.logprob_workspace(SHAPE)  # fixed: the chunked log-prob head, not per token
    assert workspace == 4 * ((1 << 30) // (4 * 32)) * 32 * 4 + 32 * 8 * 4
    assert m.activations == 10 * 2 * layer and m.logits == workspace and m.per_token == 2 * layer
    assert m.total == m.states + m.activations + m.logits + 64
    ckpt = memory.estimate_trainer_memory(SHAPE, compute_dtype="bfloat16", micro_batch_tokens=10,
                                          gradient_checkpointing=True, reference_model=True, staging_bytes=64)
    assert ckpt.activations == 10 * (2 * 2 * 8 + layer) < m.activations  # layer inputs + one recomputed layer
    assert ckpt.reference == 4000
    fp32 = memory.estimate_trainer_memory(SHAPE, compute_dtype="float32", micro_batch_tokens=10,
                                          gradient_checkpointing=False, reference_model=False, staging_bytes=0)
    assert fp32.states == 16000  # no second copy when computing in fp32


def test_check_fits_says_what_to_lower_and_its_numbers_fit():
    shape = memory.ModelShape(params=2_000_000_000, trainable_params=2_000_000_000, layers=28, hidden=2048,
                              q_dim=2048, kv_dim=1024, intermediate=6144, vocab=151936)
    need = memory.estimate_trainer_memory(shape, compute_dtype="bfloat16", micro_batch_tokens=16384,
                                          gradient_checkpointing=False, reference_model=False, staging_bytes=2 << 30)
    total = 141 * memory.GiB
    budget = memory.trainer_budget(int(total * 0.65), 1 << 30)
    with pytest.raises(memory.MemoryCheckError) as err:
        memory.check_fits(need, budget, total_bytes=total, engine_fraction=0.35)
    msg = str(err.value)
    for key in ("trainer.micro_batch_max_tokens", "model.gradient_checkpointing=true", "rollout.gpu_memory_utilization",
                "smaller model", "cluster.memory_check=false", "model states", "activations"):
        assert key in msg, key
    suggested = int(msg.split("trainer.micro_batch_max_tokens to ")[1].split(" ")[0])
    smaller = memory.estimate_trainer_memory(shape, compute_dtype="bfloat16", micro_batch_tokens=suggested,
                                             gradient_checkpointing=False, reference_model=False,
                                             staging_bytes=2 << 30)
    memory.check_fits(smaller, budget, total_bytes=total, engine_fraction=0.35)  # the advice is right
    util = float(msg.split("rollout.gpu_memory_utilization to ")[1].split(" ")[0])
    memory.check_fits(need, memory.trainer_budget(int(total * (1 - util)), 1 << 30) + memory.GiB // 10,
                      total_bytes=total, engine_fraction=util)


def test_model_shape_reads_the_config_without_weights(tiny_path, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    shape = memory.model_shape(tiny_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    assert shape.params == sum(p.numel() for p in model.parameters())
    assert (shape.layers, shape.hidden, shape.vocab) == (model.config.num_hidden_layers, model.config.hidden_size,
                                                         model.config.vocab_size)
    Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
                architectures=["Qwen3ForCausalLM"]).save_pretrained(tmp_path)
    q06 = memory.model_shape(str(tmp_path))  # Qwen3-0.6B: 0.596B parameters, q_dim 2048 > hidden 1024
    assert abs(q06.params - 596_049_920) < 1_000_000 and q06.q_dim == 2048 and q06.kv_dim == 1024


def test_staging_bytes():
    shape = memory.ModelShape(params=10, trainable_params=600_000_000, layers=1, hidden=1, q_dim=1, kv_dim=1,
                              intermediate=1, vocab=1)
    assert memory.staging_bytes(shape, "bfloat16", 1 << 30) == 2 << 30  # 1.2 GB: two buckets
    assert memory.staging_bytes(shape, "bfloat16", 2 << 30) == 2 << 30  # one bucket, one buffer


# ---- placement and the cluster fit check ------------------------------------------------------


def test_placement_plans():
    cpu = plan_placement(job(), "cpu")
    assert [r.bundles for r in cpu.requests] == [({"CPU": 1.0},), ({"CPU": 1.0},)]
    two = plan_placement(job("rollout=gpu", "trainer=gpu", "cluster=gpu_1x2"), "cuda")
    assert two.rollout.bundles == ({"CPU": 4.0, "GPU": 1.0},) and two.trainer.bundles == ({"CPU": 4.0, "GPU": 1.0},)
    assert (two.server_gpus, two.worker_gpus, two.shared) == (1.0, 1.0, False)
    one = plan_placement(job(*GPU_1X1), "cuda")
    assert one.shared and one.requests == [one.rollout] and one.rollout.bundles == ({"CPU": 8.0, "GPU": 1.0},)
    assert one.server_gpus + one.worker_gpus <= 1.0  # both actors fit in the bundle that holds the GPU


def test_shortfalls_name_resources_roles_and_keys():
    plan = plan_placement(job("rollout=gpu", "trainer=gpu", "cluster=gpu_1x2"), "cuda")
    problems = shortfalls(plan.requests, {"CPU": 16.0, "GPU": 1.0}, [{"CPU": 16.0, "GPU": 1.0}])
    assert len(problems) == 1 and problems[0].startswith("GPU: the job needs 2, the cluster has 1")
    assert "rollout 1 (rollout.num_servers=1 x rollout.tensor_parallel_size=1 GPUs" in problems[0]
    assert "trainer 1 (trainer.num_workers=1 x 1 GPU" in problems[0]
    from verl_async.pipeline.resources import advice

    assert "cluster=gpu_1x1" in advice(problems, plan)
    one = plan_placement(job(*GPU_1X1), "cuda")
    assert shortfalls(one.requests, {"CPU": 16.0, "GPU": 1.0}, [{"CPU": 16.0, "GPU": 1.0}]) == []
    # totals suffice, but no single node holds a bundle
    split = shortfalls(one.requests, {"CPU": 8.0, "GPU": 1.0}, [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0}])
    assert len(split) == 1 and "one bundle needs {'CPU': 8.0, 'GPU': 1.0} on one node" in split[0]
    custom = RoleRequest("rollout", ({"CPU": 1.0, "accel_x": 2.0},), "some.key=2")
    assert shortfalls([custom], {"CPU": 4.0}, [{"CPU": 4.0}]) == [
        "accel_x: the job needs 2, the cluster has 0 (per role: rollout 2 (some.key=2))"]


# ---- backend resolution and config checks -----------------------------------------------------


def test_backend_resolution():
    auto = SyncConfig()
    assert resolve_backend(auto, "cpu") == "gloo"
    assert resolve_backend(auto, "cuda") == "nccl"
    assert resolve_backend(auto, "cuda", shared_gpu=True) == "ipc"
    assert resolve_backend(SyncConfig(backend="ipc"), "cuda", shared_gpu=True) == "ipc"
    with pytest.raises(ConfigError, match="ipc needs CUDA"):
        resolve_backend(SyncConfig(backend="ipc"), "cpu")
    from verl_async.pipeline.launch import job_sync

    assert job_sync(job(*GPU_1X1), "cuda").backend == "ipc"
    assert job_sync(job("rollout=gpu", "trainer=gpu", "cluster=gpu_1x2"), "cuda").backend == "nccl"


def test_gpu_1x1_composes_and_bad_sharing_fails():
    j = job(*GPU_1X1)
    assert j.cluster.shared_gpu and j.rollout.gpu_memory_utilization == 0.35
    assert j.trainer.micro_batch_max_tokens == 8192 and j.trainer.fsdp
    for override, key, hint in [
        ("sync.backend=nccl", "sync.backend", "NCCL cannot connect two ranks on one GPU"),
        ("trainer.num_workers=2", "cluster.shared_gpu", "one engine and one trainer worker"),
        ("rollout.gpu_memory_utilization=0.9", "rollout.gpu_memory_utilization", "the engine's share"),
        ("cluster.device=cpu", "cluster.shared_gpu", "needs cluster.device=cuda"),
    ]:
        with pytest.raises(ConfigError) as err:
            job(*GPU_1X1, override)
        assert key in str(err.value) and hint in str(err.value), override
    with pytest.raises(ConfigError, match="cluster.shared_gpu=true"):
        job("rollout=gpu", "trainer=gpu", "cluster=gpu_1x2", "sync.backend=ipc")


# ---- IPC payloads (both vLLM versions) --------------------------------------------------------

# vLLM 0.26's IPCWeightTransferUpdateInfo fields (vllm/distributed/weight_transfer/ipc_engine.py, 0.26.0);
# its IPCWeightTransferInitInfo has none.
VLLM_026_UPDATE_FIELDS = {"names", "dtype_names", "shapes", "ipc_handles", "ipc_handles_pickled", "tensor_sizes",
                          "packed"}
METAS = [TensorMeta("a", "bfloat16", [2, 3]), TensorMeta("b", "float32", [4])]


def test_ipc_payloads_parse_into_the_installed_vllm(monkeypatch):
    from vllm.distributed.weight_transfer.ipc_engine import (
        IPCWeightTransferInitInfo,
        IPCWeightTransferUpdateInfo,
    )

    monkeypatch.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    handle = {"GPU-1234": (torch.Tensor, (12,), 3, "x")}
    init = compat.engine_init_info("ipc", master_address="h", master_port=1, rank_offset=1, world_size=2,
                                   bucket_bytes=1 << 20, timeout_s=5.0)
    IPCWeightTransferInitInfo(**init)
    update = compat.ipc_update_info(METAS, [12, 16], handle)
    parsed = IPCWeightTransferUpdateInfo(**update)
    assert parsed.ipc_handles == handle and parsed.tensor_sizes == [12, 16] and parsed.names == ["a", "b"]
    packed_in = init if compat.ipc_packed_in_init() else update
    assert packed_in["packed"] is True
    with pytest.raises(ValueError, match="per bucket"):
        compat.engine_update_info("ipc", METAS, 1 << 20)


@pytest.mark.parametrize("packed_in_init", [True, False], ids=["vllm-0.32", "vllm-0.26"])
def test_ipc_payload_layout_per_version(monkeypatch, packed_in_init):
    monkeypatch.setattr(compat, "ipc_packed_in_init", lambda: packed_in_init)
    init = compat.engine_init_info("ipc", master_address="h", master_port=1, rank_offset=1, world_size=2,
                                   bucket_bytes=1 << 20, timeout_s=5.0)
    update = compat.ipc_update_info(METAS, [12, 16], {"u": (1, 2)})
    if packed_in_init:
        assert init == {"packed": True} and "packed" not in update
    else:
        assert init == {} and update["packed"] is True and set(update) <= VLLM_026_UPDATE_FIELDS
    assert pickle.loads(base64.b64decode(update["ipc_handles_pickled"])) == {"u": (1, 2)}
    with pytest.raises(ValueError, match="2 tensors but 1 sizes"):
        compat.ipc_update_info(METAS, [12], {})


# ---- the IPC sender's hand-over, on CPU tensors ------------------------------------------------


class FakeEngines:
    """Stands in for export + engine: each handle names the exported tensor; `submit` snapshots the
    bytes, `wait` checks the trainer did not touch them before the engine was done, then unpacks them
    as vLLM's consumer does (split by tensor_sizes, view as dtype and shape)."""

    def __init__(self, fail_at: int | None = None):
        self.exported: list[torch.Tensor] = []
        self.loaded: dict[str, torch.Tensor] = {}
        self.buckets: list[list[str]] = []
        self.inflight = self.max_inflight = 0
        self.fail_at = fail_at

    def export(self, flat, uuid):
        self.exported.append(flat)
        return {uuid: (len(self.exported) - 1,)}

    def submit(self, info):
        assert set(info) <= VLLM_026_UPDATE_FIELDS
        (index,) = pickle.loads(base64.b64decode(info["ipc_handles_pickled"]))["cpu"]
        flat = self.exported[index]
        assert flat.dtype == torch.uint8 and flat.numel() == sum(info["tensor_sizes"])
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        return info, flat, flat.clone()

    def wait(self, ticket, timeout_s):
        info, flat, snapshot = ticket
        self.inflight -= 1
        if self.fail_at == len(self.buckets):
            raise TimeoutError("no answer")
        assert torch.equal(flat, snapshot), "the trainer overwrote a bucket before the engine loaded it"
        self.buckets.append(info["names"])
        for name, dtype, shape, part in zip(info["names"], info["dtype_names"], info["shapes"],
                                            snapshot.split(info["tensor_sizes"]), strict=True):
            self.loaded[name] = part.view(getattr(torch, dtype)).view(shape)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [("w0", torch.randn(64, generator=g)), ("w1", torch.randn(8, 8, generator=g).t()),  # non-contiguous
            ("big", torch.randn(300, generator=g)), ("w2", torch.randn(3, generator=g).to(torch.bfloat16)),
            ("w3", torch.randn(10, generator=g)), ("w4", torch.arange(5)), ("w5", torch.randn(120, generator=g))]


def test_ipc_sender_hands_over_every_bucket_intact():
    from verl_async.sync.ipc import IpcSender

    engines = FakeEngines()
    sender = IpcSender(engines, 30.0, device=torch.device("cpu"), export=engines.export)
    named = _tensors()
    for _ in range(2):  # a second sync reuses the same staging buffers
        engines.loaded.clear()
        engines.buckets.clear()
        stats = sender.send(iter(named), bucket_bytes=512)
        for name, want in named:
            assert torch.equal(engines.loaded[name], want), name
    # 256 + 256 B fill one bucket; the 1200 B tensor travels alone from its own memory; bf16 w2 (6 B) leaves
    # w3 (fp32) at an offset it cannot be viewed at, so w3 starts a bucket; w5 (480 B) overflows it
    assert engines.buckets == [["w0", "w1"], ["big"], ["w2"], ["w3", "w4"], ["w5"]]
    assert stats["sync/buckets"] == 5.0 and stats["sync/engine_wait_s"] >= 0.0
    assert engines.max_inflight == 2  # packs bucket k+1 while the engines load bucket k, never more
    big = dict(named)["big"]
    assert any(e.data_ptr() == big.data_ptr() for e in engines.exported)  # no copy for the big one
    assert all(b is None or b.numel() == 512 for b in sender.buffers)


def test_ipc_sender_times_out_with_the_bucket_named():
    from verl_async.sync.ipc import IpcSender

    engines = FakeEngines(fail_at=1)
    sender = IpcSender(engines, 30.0, device=torch.device("cpu"), export=engines.export)
    with pytest.raises(TimeoutError, match=r"did not load IPC bucket 1 within the sync deadline \(sync.timeout_s=30\)"):
        sender.send(iter(_tensors()), bucket_bytes=512)


def test_loop_engine_link_runs_updates_on_the_loop():
    from verl_async.sync.ipc import LoopEngineLink, engine_link

    class Server:
        def __init__(self):
            self.got = []

        async def update_weights(self, info):
            await asyncio.sleep(0.01)
            self.got.append(info["names"])

    async def main():
        servers = [Server(), Server()]
        link = engine_link(LoopEngineLink(servers, asyncio.get_running_loop()))
        ticket = await asyncio.to_thread(link.submit, {"names": ["x"]})
        await asyncio.to_thread(link.wait, ticket, 5.0)
        return [s.got for s in servers]

    assert asyncio.run(main()) == [[["x"]], [["x"]]]
    with pytest.raises(ValueError, match="needs the engines"):
        engine_link([])


def test_coordinator_ipc_transfer_is_the_sender_alone():
    from verl_async.sync.coordinator import WeightSyncCoordinator

    calls = []

    class Server:
        async def init_weight_transfer(self, info):
            calls.append(("init", info))

        async def pause(self, mode="keep", clear_cache=True):
            calls.append("pause")

        async def start_weight_update(self):
            calls.append("start")

        async def update_weights(self, info):
            raise AssertionError("with ipc only the sender calls update_weights")

        async def finish_weight_update(self, policy_version):
            calls.append("finish")

        async def resume(self):
            calls.append("resume")

    class Sender:
        def init_weight_sender(self, backend, address, port, world_size, timeout_s, servers=None):
            calls.append(("sender", backend, len(servers)))

        def tensor_metas(self):
            return [TensorMeta("w", "bfloat16", [2])]

        def send_weights(self, bucket_bytes):
            calls.append("send")
            return {"sync/bytes": 4.0, "sync/transfer_s": 0.01, "sync/gather_s": 0.0, "sync/buckets": 1.0,
                    "sync/engine_wait_s": 0.005}

    coord = WeightSyncCoordinator([Server()], Sender(), SyncConfig(backend="ipc", timeout_s=5.0), device="cuda")
    metrics = asyncio.run(coord.setup(0))
    assert ("sender", "ipc", 1) in calls and "send" in calls and "pause" in calls and calls[-1] == "resume"
    assert metrics["sync/buckets"] == 1.0 and metrics["sync/send_s"] == 0.01 and "sync/transfer_s" in metrics


def test_pipeline_gpu_scenarios_compose_for_one_gpu(monkeypatch):
    """Every scenario of benchmarks/pipeline_gpu.py composes into a valid gpu_1x1 job (the GPU run has
    no second chance) whose trainer fits an H200 beside the engine by the estimate."""
    import sys

    from pipeline_runs import CONFIGS as configs

    sys.path.insert(0, str(configs.parent / "benchmarks"))
    monkeypatch.setenv("VLLM_LOGGING_STREAM", "ext://sys.stdout")  # the script would point vLLM's logs elsewhere
    import pipeline_gpu

    monkeypatch.setattr(sys, "argv", ["pipeline_gpu.py", "--scenarios", "all"])
    args = pipeline_gpu.parse_args()
    shapes = {"q06": memory.ModelShape(596_049_920, 596_049_920, 28, 1024, 2048, 1024, 3072, 151936),
              "q17": memory.ModelShape(1_720_574_976, 1_720_574_976, 28, 2048, 2048, 1024, 6144, 151936)}
    for sc in args.scenarios:
        j = job(*pipeline_gpu.overrides(sc, args, "/models/x", CONFIGS / "x"))
        assert j.cluster.shared_gpu and j.pipeline.mode == sc.mode and not j.trainer.save_at_end
        assert j.rollout.n * j.pipeline.batch_groups in (128, 256)
        need = memory.estimate_trainer_memory(
            shapes[sc.shape], compute_dtype=j.model.dtype, micro_batch_tokens=j.trainer.micro_batch_max_tokens,
            gradient_checkpointing=j.model.gradient_checkpointing, reference_model=j.algorithm.kl_coef > 0,
            staging_bytes=memory.staging_bytes(shapes[sc.shape], j.model.dtype, j.sync.bucket_bytes))
        h200_free = int(140 * memory.GiB * (1 - j.rollout.gpu_memory_utilization)) - memory.GiB
        memory.check_fits(need, memory.trainer_budget(h200_free, j.sync.bucket_bytes), total_bytes=140 * memory.GiB,
                          engine_fraction=j.rollout.gpu_memory_utilization)
    assert {(sc.task, sc.mode) for sc in args.scenarios} >= {("digits_longtail", "partial_rollout"),
                                                             ("digits_longtail", "sync_baseline")}
