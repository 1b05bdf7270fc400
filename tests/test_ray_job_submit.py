"""`ray job submit --working-dir . -- verl-async ...` against a head started on loopback."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, timeout_s: float, head: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return  # it answers (Ray 2.60 asks for its auth token, which the CLI reads itself)
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not come up in {timeout_s} s")


def test_ray_job_submit_runs_a_short_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PATH": f"{BIN}:{os.environ['PATH']}"}
    submit_env = env | {"RAY_AUTH_MODE": "token"}  # Ray 2.60 heads require their token (~/.ray/auth_token)
    gcs, dash = _free_port(), _free_port()
    # The test session's own Ray runtime already holds Ray's default agent ports (52365, ...): a
    # second head on the same machine needs its own, or its job agent never comes up.
    ports = {flag: _free_port() for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                             "runtime-env-agent-port", "metrics-export-port",
                                             "node-manager-port", "object-manager-port", "ray-client-server-port")}
    ray_tmp = tempfile.mkdtemp(prefix="vra", dir="/tmp")  # Ray's socket paths must stay under 108 chars
    # --block keeps the head in this child process: terminating it stops only this cluster.
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=4",
         *(f"--{flag}={port}" for flag, port in ports.items()),
         f"--temp-dir={ray_tmp}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(f"http://127.0.0.1:{dash}/api/version", timeout_s=180, head=head)
        out = tmp_path / "run"
        for _ in range(12):  # the head answers HTTP before its job agent is up: Ray says "try again later"
            res = subprocess.run(
                [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}",
                 "--", "verl-async", "pipeline.total_steps=2", "pipeline.batch_groups=4",
                 "logging.wandb_mode=disabled", "logging.progress_bar=false", "logging.plots=false",
                 f"output_dir={out}"],
                env=submit_env, capture_output=True, text=True, timeout=900)
            if "No available agent to submit job" not in res.stdout + res.stderr:
                break
            time.sleep(10)
        log = res.stdout + res.stderr
        assert res.returncode == 0, log[-4000:]
        assert "succeeded" in log, log[-4000:]
        job_lines = [ln for ln in log.splitlines() if "verl_async" in ln]
        assert "final metrics:" in job_lines[-2] or "final metrics:" in job_lines[-1], log[-4000:]
        assert (out / "metrics.jsonl").exists()
    finally:
        head.terminate()
        head.wait(timeout=60)
        shutil.rmtree(ray_tmp, ignore_errors=True)
