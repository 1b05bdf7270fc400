"""Shared fixtures: locally built assets, one Ray runtime per session, GPU skipping.

Engine start costs ~60 s on the 2-core CI box (two processes each import vLLM), so
integration tests share engines through module-scoped fixtures.
"""

import os

import pytest

ASSETS_DIR = os.environ.get("VERL_ASYNC_ASSETS", os.path.expanduser("~/.cache/verl_async/assets"))


def pytest_collection_modifyitems(config, items):
    import shutil

    has_gpu = shutil.which("nvidia-smi") is not None and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets_dir() -> str:
    return ASSETS_DIR


@pytest.fixture(scope="session")
def tiny_path(assets_dir) -> str:
    from verl_async.assets.build import ensure_asset

    return str(ensure_asset(assets_dir, "tiny"))


@pytest.fixture(scope="session")
def counter_path(assets_dir) -> str:
    from verl_async.assets.build import ensure_asset

    return str(ensure_asset(assets_dir, "counter", step=1))


@pytest.fixture(scope="session")
def counters(assets_dir) -> dict[int, str]:
    """Counter models by STEP (greedy output = previous token + STEP): a weight flip shows at its token."""
    from verl_async.assets.build import ensure_asset

    return {step: str(ensure_asset(assets_dir, "counter", step=step)) for step in (1, 2)}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime for the whole test session (logical CPUs so several actors fit)."""
    import ray

    from verl_async.pipeline.launch import start_local_ray

    if not ray.is_initialized():
        start_local_ray(num_cpus=8)
    yield ray
    ray.shutdown()
