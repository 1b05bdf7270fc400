"""A real two-node Ray cluster on one machine: a head and a worker node, each a `ray start --block`
child process with its own IP, custom resource, ports and temp dir, so jobs can be pinned to one
node or the other. Terminating the two children stops only this cluster.

The worker node registers as 127.0.0.2; Ray registers the head under the machine's own address
even when asked for 127.0.0.1, so the two nodes have distinct addresses either way."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
# Ray's per-node ports: the test session's own Ray runtime already holds the defaults.
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """For every process of the cluster and its clients: Ray 2.60 heads enable token authentication
    (the token `ray start` wrote to ~/.ray/auth_token), which clients only send with RAY_AUTH_MODE=token."""
    return ({k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            | {"PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token"})


def _start_node(args: list[str], temp_dir: str, log: Path) -> subprocess.Popen:
    ports = [f"--{flag}={free_port()}" for flag in NODE_PORTS]
    with log.open("w") as out:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args, *ports, f"--temp-dir={temp_dir}",
                                 "--object-store-memory=200000000", "--disable-usage-stats"],
                                env=ray_env(), stdout=out, stderr=subprocess.STDOUT)


def _wait_for_port(port: int, procs: list[subprocess.Popen], timeout_s: float) -> None:
    """The head's GCS accepts connections (enough for a worker node to join)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a `ray start` node exited early (see its log in the test's tmp dir)")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.5)
    raise TimeoutError(f"the head's port {port} did not open in {timeout_s} s")


def _wait_for_nodes(address: str, count: int, procs: list[subprocess.Popen], timeout_s: float) -> None:
    code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a `ray start` node exited early (see its log in the test's tmp dir)")
        res = subprocess.run([sys.executable, "-c", code, address], env=ray_env(), capture_output=True, text=True,
                             timeout=120)
        if res.returncode == 0 and res.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise TimeoutError(f"the {count}-node cluster at {address} did not come up in {timeout_s} s")


@dataclass
class Cluster:
    address: str  # the head's GCS, host:port
    head_pid: int  # the `ray start` processes: a node's Ray processes are their descendants
    worker_pid: int


@contextlib.contextmanager
def two_node_cluster(logs: Path, head_resource: str, worker_resource: str, cpus: int = 2) -> Iterator[Cluster]:
    """Head with {head_resource: 1}, worker on 127.0.0.2 with {worker_resource: 1}, `cpus` logical CPUs each."""
    # Ray's socket paths must stay under 108 characters: short temp dirs, one per node.
    temp_dirs = [tempfile.mkdtemp(prefix="vrn", dir="/tmp") for _ in range(2)]
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs = [_start_node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                          f"--ray-client-server-port={free_port()}", f"--num-cpus={cpus}",
                          f"--resources={{\"{head_resource}\": 1}}"], temp_dirs[0], logs / "ray_head.log")]
    try:
        _wait_for_port(port, procs, timeout_s=180)
        procs.append(_start_node([f"--address={address}", "--node-ip-address=127.0.0.2", f"--num-cpus={cpus}",
                                  f"--resources={{\"{worker_resource}\": 1}}"], temp_dirs[1], logs / "ray_worker.log"))
        _wait_for_nodes(address, 2, procs, timeout_s=180)
        yield Cluster(address, procs[0].pid, procs[1].pid)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)
