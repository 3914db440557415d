"""A Ray cluster of separate nodes on this machine, for tests: a head and workers started with `ray start` as their
own process trees, each with its own temp folder and home (so its own `~/.cache/personalize` mirror: the nodes
share no working folder), token authentication on, S3 credentials in their environment as a cluster's nodes have
them. Nodes of one cluster must reach each other, so Ray listens on the machine's address here, not only on
loopback: this is for tests, and the cluster lives as long as one test."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pipelines.reaper import session_processes, stop


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Node:
    name: str
    folder: Path

    @property
    def temp_dir(self) -> Path:
        return self.folder / "ray"

    @property
    def home(self) -> Path:
        return self.folder / "home"

    def raylet(self) -> psutil.Process:
        for proc in session_processes(str(self.temp_dir)):
            try:
                if proc.name() == "raylet":
                    return proc
            except psutil.NoSuchProcess:
                continue
        raise LookupError(f"node {self.name} has no raylet running")

    def lose(self, pid_to_wait_for: int, grace_s: float = 20.0) -> bool:
        """The node lost as a machine is lost: its raylet SIGKILLed by PID, then, once `pid_to_wait_for` (a worker
        of this node) has ended or `grace_s` has passed, every process left of the node SIGKILLed too. True when
        the worker ended on its own (Ray ends a node's workers when their raylet is gone)."""
        self.raylet().kill()
        try:
            psutil.Process(pid_to_wait_for).wait(timeout=grace_s)
            ended = True
        except psutil.TimeoutExpired:
            ended = False
        except psutil.NoSuchProcess:
            ended = True
        for proc in session_processes(str(self.temp_dir)):
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        return ended

    def holds(self, pid: int) -> bool:
        return pid in {p.pid for p in session_processes(str(self.temp_dir))}


@dataclass
class LocalCluster:
    folder: Path
    env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)
    address: str = ""

    def start_head(self, cpus: int) -> Node:
        gcs, dashboard = free_ports(2)
        node = self._start("head", ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                                    f"--num-cpus={cpus}"])
        self.address = f"{socket.gethostbyname(socket.gethostname())}:{gcs}"
        return node

    def add_worker(self, name: str, cpus: int) -> Node:
        ports = free_ports(7)
        names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "metrics-export-port", "runtime-env-agent-port", "min-worker-port"]
        flags = [f"--{n}={p}" for n, p in zip(names, ports)]
        flags[-1] = f"--min-worker-port={30000 + 200 * len(self.nodes)}"
        flags.append(f"--max-worker-port={30000 + 200 * len(self.nodes) + 199}")
        return self._start(name, [f"--address={self.address}", f"--num-cpus={cpus}", *flags])

    def _start(self, name: str, flags: list[str]) -> Node:
        node = Node(name, self.folder / name)
        node.home.mkdir(parents=True)
        env = {**self.env, "HOME": str(node.home)}
        ray = str(Path(sys.executable).parent / "ray")
        command = [ray, "start", *flags, f"--temp-dir={node.temp_dir}", "--disable-usage-stats",
                   f"--resources={json.dumps({f'node:{name}': 1})}"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
        if done.returncode != 0:
            raise RuntimeError(f"ray start for node {name} failed:\n{done.stdout}\n{done.stderr}")
        self.nodes.append(node)
        return node

    def wait_for_nodes(self, timeout: float = 60) -> None:
        import ray

        deadline = time.time() + timeout
        while len([n for n in ray.nodes() if n["Alive"]]) < len(self.nodes):
            if time.time() > deadline:
                raise TimeoutError(f"only {len(ray.nodes())} of {len(self.nodes)} nodes joined")
            time.sleep(0.5)

    def node_of(self, pid: int) -> Node:
        return next(n for n in self.nodes if n.holds(pid))

    def stop(self) -> None:
        for node in reversed(self.nodes):
            stop(session_processes(str(node.temp_dir)), grace_s=3)


def cluster_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment every node and the driver share: token authentication, and what the test passes (S3)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PERSONALIZE_CACHE"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1", **extra)
    return env
