"""`personalize stack up | down | status`: the local stack on 127.0.0.1.

SeaweedFS (`weed mini`, telemetry off) serves S3, an MLflow server keeps runs in SQLite and proxies artifacts
to s3://mlflow/artifacts on it, and a Ray head takes jobs. Everything lives under one folder (default
./.stack); `up` is idempotent, `down` stops exactly the processes `up` started (by their recorded process
groups). Credentials for the local S3 and the Ray head's auth token (Ray's token authentication, on here)
are generated once into .stack/env.sh (mode 600) and never printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Ports:
    s3: int = 8333
    master: int = 9333
    volume: int = 9340
    filer: int = 8888
    admin: int = 23646
    mlflow: int = 5000
    ray: int = 6390
    dashboard: int = 8265
    agent: int = 52365  # the dashboard agent on the head: `ray job submit` goes through it

    @classmethod
    def offset(cls, delta: int) -> Ports:
        return cls(**{k: v + delta for k, v in cls().__dict__.items()})


def group_running(pgid: int) -> bool:
    """Whether a process group still has a live member (zombies, which only wait to be reaped, do not count)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp, ...
            return True
    return False


class Stack:
    def __init__(self, folder: str | Path = ".stack", ports: Ports = Ports()):
        self.folder = Path(folder).resolve()
        self.ports = ports
        self._started: dict[str, subprocess.Popen] = {}

    # ------------------------------------------------------------------ environment

    @property
    def env_file(self) -> Path:
        return self.folder / "env.sh"

    def credentials(self) -> dict[str, str]:
        """The local S3 admin identity and the Ray auth token: generated on first use, kept in env.sh (0600)."""
        path = self.folder / "credentials.json"
        if not path.is_file():
            self.folder.mkdir(parents=True, exist_ok=True)
            creds = {"AWS_ACCESS_KEY_ID": "local" + secrets.token_hex(6), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
                     "RAY_AUTH_TOKEN": secrets.token_hex(32)}
            path.write_text(json.dumps(creds))
            path.chmod(0o600)
        creds = json.loads(path.read_text())
        if "RAY_AUTH_TOKEN" not in creds:  # a stack folder from before Ray token auth
            creds["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
            path.write_text(json.dumps(creds))
        return creds

    def client_env(self) -> dict[str, str]:
        """What a client (a batch, `ray job submit`, a test) exports to use this stack."""
        return {**self.credentials(), "RAY_AUTH_MODE": "token", "AWS_ENDPOINT_URL_S3": f"http://{HOST}:{self.ports.s3}", "AWS_REGION": "us-east-1",
                "MLFLOW_TRACKING_URI": f"http://{HOST}:{self.ports.mlflow}", "RAY_ADDRESS": f"http://{HOST}:{self.ports.dashboard}",
                "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0"}

    def write_env_file(self) -> None:
        lines = [f"export {k}={v}" for k, v in self.client_env().items()]
        self.env_file.write_text("\n".join(lines) + "\n")
        self.env_file.chmod(0o600)

    # ------------------------------------------------------------------ processes

    def _pid_file(self, name: str) -> Path:
        return self.folder / f"{name}.pid"

    def _alive(self, name: str) -> int | None:
        path = self._pid_file(name)
        if not path.is_file():
            return None
        pid = int(path.read_text())
        try:
            os.killpg(pid, 0)
            return pid
        except (ProcessLookupError, PermissionError):
            return None

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> None:
        log = open(self.folder / f"{name}.log", "ab")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                                start_new_session=True, cwd=self.folder)
        self._pid_file(name).write_text(str(proc.pid))
        self._started[name] = proc

    def _bin(self, name: str) -> str:
        local = Path(sys.executable).parent / name
        found = str(local) if local.exists() else shutil.which(name)
        if not found:
            raise RuntimeError(f"`{name}` is not installed (it comes with this project's requirements)")
        return found

    # ------------------------------------------------------------------ services

    def _weed(self) -> list[str]:
        p = self.ports
        data = self.folder / "seaweedfs"
        data.mkdir(parents=True, exist_ok=True)
        return [self._bin("weed"), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}", "-master.telemetry=false",
                "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.port={p.s3}", f"-master.port={p.master}",
                f"-volume.port={p.volume}", f"-filer.port={p.filer}", f"-admin.port={p.admin}"]

    def _mlflow(self) -> list[str]:
        data = self.folder / "mlflow"
        data.mkdir(parents=True, exist_ok=True)
        return [self._bin("mlflow"), "server", "--host", HOST, "--port", str(self.ports.mlflow), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{data / 'mlflow.db'}", "--artifacts-destination", "s3://mlflow/artifacts",
                "--uvicorn-opts", "--timeout-graceful-shutdown 2"]  # open UI connections otherwise hold `down`

    @property
    def ray_temp(self) -> Path:
        """Ray's session folder holds Unix sockets, whose paths may not exceed 107 bytes: keep it short."""
        digest = hashlib.sha1(str(self.folder).encode()).hexdigest()[:10]
        return Path(tempfile.gettempdir()) / f"pz-ray-{digest}"

    def _ray(self) -> list[str]:
        p = self.ports
        link = self.folder / "ray"
        if not link.exists():
            link.symlink_to(self.ray_temp, target_is_directory=True)  # logs under .stack/ray as for the other services
        return [self._bin("ray"), "start", "--head", "--block", f"--node-ip-address={HOST}", f"--port={p.ray}",
                f"--dashboard-host={HOST}", f"--dashboard-port={p.dashboard}", "--include-dashboard=true",
                f"--dashboard-agent-listen-port={p.agent}",
                f"--temp-dir={self.ray_temp}", "--disable-usage-stats", "--num-cpus=4",
                "--object-store-memory=1000000000", f"--ray-client-server-port={p.ray + 1}", f"--min-worker-port={p.ray + 100}", f"--max-worker-port={p.ray + 400}"]

    def s3_healthy(self) -> bool:
        try:
            import boto3

            boto3.client("s3", endpoint_url=f"http://{HOST}:{self.ports.s3}", region_name="us-east-1",
                         aws_access_key_id=self.credentials()["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=self.credentials()["AWS_SECRET_ACCESS_KEY"]).list_buckets()
            return True
        except Exception:
            return False

    @staticmethod
    def http_ok(url: str, expect: str | None = None, token: str | None = None) -> bool:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as r:
                return r.status == 200 and (expect is None or expect in r.read().decode())
        except Exception:
            return False

    def mlflow_healthy(self) -> bool:
        return self.http_ok(f"http://{HOST}:{self.ports.mlflow}/health", "OK")

    def ray_healthy(self) -> bool:
        """The dashboard answers and so does the head's agent (until it does, job submissions are refused)."""
        token = self.credentials()["RAY_AUTH_TOKEN"]
        return (self.http_ok(f"http://{HOST}:{self.ports.dashboard}/api/version", token=token)
                and self.http_ok(f"http://{HOST}:{self.ports.agent}/api/local_raylet_healthz", token=token))

    def services(self):
        s3 = {k: v for k, v in self.credentials().items() if k.startswith("AWS_")}
        s3_env = {**s3, "WEED_TELEMETRY": "false"}
        mlflow_env = {**s3, "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{self.ports.s3}",
                      "AWS_ENDPOINT_URL_S3": f"http://{HOST}:{self.ports.s3}", "MLFLOW_DISABLE_TELEMETRY": "true"}
        ray_env = {k: v for k, v in self.client_env().items() if k != "RAY_ADDRESS"}
        ray_env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
        return [("seaweedfs", self._weed, s3_env, self.s3_healthy, f"http://{HOST}:{self.ports.s3} (S3)"),
                ("mlflow", self._mlflow, mlflow_env, self.mlflow_healthy, f"http://{HOST}:{self.ports.mlflow} (MLflow UI)"),
                ("ray", self._ray, ray_env, self.ray_healthy, f"http://{HOST}:{self.ports.dashboard} (Ray dashboard)")]

    # ------------------------------------------------------------------ commands

    def up(self, timeout: float = 180, only: tuple[str, ...] | None = None) -> dict[str, str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.write_env_file()
        began, urls = time.perf_counter(), {}
        for name, command, env, healthy, url in self.services():
            if only is not None and name not in only:
                continue
            if not (self._alive(name) and healthy()):
                if self._alive(name):
                    self._stop(name)
                busy = self._busy_port(name)
                if busy:
                    raise RuntimeError(f"port {busy} for {name} is taken by another program; stop it or use --port-offset")
                self._spawn(name, command(), env)
                try:
                    self._wait(name, healthy, timeout)
                except Exception:
                    self._stop(name, grace=5)  # never leave a half-started service holding its ports
                    if name == "ray":
                        self._kill_leftover_ray()
                    raise
            if name == "seaweedfs":
                self._buckets()
            urls[name] = url
        urls["seconds"] = f"{time.perf_counter() - began:.1f}"
        return urls

    def _busy_port(self, name: str) -> int | None:
        port = {"seaweedfs": self.ports.s3, "mlflow": self.ports.mlflow, "ray": self.ports.dashboard}[name]
        with socket.socket() as s:
            return port if s.connect_ex((HOST, port)) == 0 else None

    def _wait(self, name: str, healthy, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if healthy():
                return
            proc = self._started.get(name)
            if not self._alive(name) or (proc is not None and proc.poll() is not None):
                tail = (self.folder / f"{name}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited while starting; its log ends with:\n{tail}")
            time.sleep(1)
        raise RuntimeError(f"{name} did not become healthy within {timeout:.0f} s (log: {self.folder / f'{name}.log'})")

    def _buckets(self) -> None:
        import boto3

        creds = self.credentials()
        s3 = boto3.client("s3", endpoint_url=f"http://{HOST}:{self.ports.s3}", region_name="us-east-1",
                          aws_access_key_id=creds["AWS_ACCESS_KEY_ID"], aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        for bucket in ("mlflow", "personalize"):
            if bucket not in existing:
                s3.create_bucket(Bucket=bucket)

    def _stop(self, name: str, grace: float = 8) -> bool:
        pid = self._alive(name)
        if pid is None:
            self._pid_file(name).unlink(missing_ok=True)
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + grace
        started = self._started.pop(name, None)
        while time.time() < deadline and group_running(pid):
            time.sleep(0.2)
        if group_running(pid):
            os.killpg(pid, signal.SIGKILL)
        if started is not None:
            started.poll()  # reap the leader we started
        self._pid_file(name).unlink(missing_ok=True)
        return True

    def down(self) -> list[str]:
        """Stop what `up` started, Ray first (it may hold jobs writing to the others)."""
        # Ray's daemons keep nothing worth a graceful shutdown here (its jobs' results are in S3 and MLflow)
        stopped = [name for name, *_ in reversed(self.services()) if self._stop(name, grace=3 if name == "ray" else 8)]
        self._kill_leftover_ray()
        return stopped

    def _kill_leftover_ray(self) -> None:
        """Ray daemons outlive `ray start --block` if it is killed hard; they carry our temp dir in their command."""
        marker = str(self.ray_temp)
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmd and int(proc.name) != os.getpid():
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def status(self) -> dict[str, str]:
        return {name: ("up " if self._alive(name) and healthy() else "down ") + url
                for name, _, _, healthy, url in self.services()}


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="personalize stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(
                                         "examples:\n  personalize stack up && source .stack/env.sh\n"
                                         "  personalize stack status\n  personalize stack down"))
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=".stack", help="where the stack keeps its data, logs and pids")
    parser.add_argument("--port-offset", type=int, default=0, help="shift every port (to run two stacks)")
    args = parser.parse_args(argv)
    stack = Stack(args.dir, Ports.offset(args.port_offset))
    if args.action == "up":
        urls = stack.up()
        print(f"stack up in {urls.pop('seconds')} s:")
        for name, url in urls.items():
            print(f"  {name:10} {url}")
        print(f"\nUse it from this shell:  source {stack.env_file}")
        print("(S3 credentials, endpoint, MLFLOW_TRACKING_URI and RAY_ADDRESS; the file is readable by you only)")
    elif args.action == "down":
        stopped = stack.down()
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
    else:
        for name, state in stack.status().items():
            print(f"  {name:10} {state}")
    return 0
