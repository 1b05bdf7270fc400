"""Trainer checkpoints (torch DCP, sharded model + optimizer) and HF export for vLLM.

Layout of a checkpoint folder:
    dcp/                 model and optimizer state, one shard per rank (torch.distributed.checkpoint)
    trainer_state.pt     scheduler, step, policy_version, the pipeline's extra_state (rank 0)
    rng_rank{r}.pt       each rank's RNG states
A checkpoint is written to `<path>.tmp` and renamed when every rank has finished, so a
crash never leaves a half-written folder under `path`. All ranks must call these functions.
"""

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".safetensors.index.json", ".bin.index.json")
MAX_SHARD_BYTES = 4 << 30


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], rank: int) -> None:
    """Write model + optimizer (DCP), trainer_state (rank 0) and RNG (each rank) to `path`."""
    final, tmp = Path(path), Path(str(path) + ".tmp")
    if rank == 0 and tmp.exists():
        shutil.rmtree(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        logger.info("saved checkpoint step=%s to %s", trainer_state.get("step"), final)
    dist.barrier()


def load_checkpoint(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int) -> dict[str, Any]:
    """Restore model, optimizer and this rank's RNG from `path`; return the saved trainer_state."""
    folder = Path(path)
    if not (folder / "trainer_state.pt").exists():
        raise FileNotFoundError(f"{folder} is not a trainer checkpoint (no trainer_state.pt); pass the folder "
                                "that save_checkpoint wrote.")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(folder / "dcp"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = folder / f"rng_rank{rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        logger.warning("%s has no RNG state for rank %d (saved with fewer ranks?): RNG not restored", folder, rank)
    return torch.load(folder / "trainer_state.pt", weights_only=False)


def write_hf_folder(path: str, model_path: str, tensors: dict[str, torch.Tensor], dtype: str) -> None:
    """An HF folder vLLM and transformers can load: non-weight files of model_path (config,
    tokenizer, chat template, processor), config dtype set to `dtype`, and safetensors shards."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    for src in Path(model_path).iterdir():
        if src.is_file() and not src.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(src, out / src.name)
    config = json.loads((out / "config.json").read_text())
    config["dtype"] = dtype
    if "torch_dtype" in config:  # older transformers name
        config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            weight_map |= dict.fromkeys(shard, fname)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    logger.info("exported HF model (%d tensors, %d file(s)) to %s", len(tensors), len(shards), out)
