"""GPUs by name: `ckptd health`, `ckptd status` and the metrics say which GPU is which and who uses it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import fake_nvml
from test_daemon import TESTS, DaemonProc

from ckptd.daemon.client import DaemonLink, open_socket, status_of
from ckptd.daemon.protocol import Register

OLD_DRIVER = [
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetPciInfo",
    "nvmlSystemGetCudaDriverVersion",
    "nvmlDeviceGetComputeRunningProcesses",
]


def health(tmp_path, timeline: dict, *args: str) -> subprocess.CompletedProcess:
    tl = tmp_path / "timeline.json"
    tl.write_text(json.dumps(timeline))
    env = {
        **os.environ,
        "CKPTD_NVML_MODULE": "fake_nvml",
        "FAKE_NVML_TIMELINE": str(tl),
        "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", "ckptd.cli", "health", *args], capture_output=True, text=True, env=env, timeout=60
    )


def test_health_names_each_gpu_its_bus_driver_and_cuda(tmp_path):
    res = health(tmp_path, {"gpus": 2})
    assert res.returncode == 0, res.stderr
    assert "driver 550.54.15, CUDA 12.4" in res.stdout
    for i in (0, 1):
        assert fake_nvml.uuid(i) in res.stdout and fake_nvml.bus_id(i) in res.stdout
    assert res.stdout.count(fake_nvml.NAME) == 2
    gpus = json.loads(health(tmp_path, {"gpus": 2}, "--json").stdout)["gpus"]
    assert [(g["index"], g["uuid"], g["pci_bus_id"], g["driver"], g["cuda"], g["processes"]) for g in gpus] == [
        (i, fake_nvml.uuid(i), fake_nvml.bus_id(i), "550.54.15", "12.4", []) for i in (0, 1)
    ]


def test_an_older_driver_shows_na_and_the_health_signals_still(tmp_path):
    timeline = {"gpus": 1, "not_supported": OLD_DRIVER, "events": [{"t": 0, "gpu": 0, "xid": 79}]}
    res = health(tmp_path, timeline)
    assert res.returncode == 0, res.stderr
    assert "driver 550.54.15, CUDA n/a" in res.stdout and fake_nvml.NAME in res.stdout
    assert fake_nvml.uuid(0) not in res.stdout and "n/a" in res.stdout
    (gpu,) = json.loads(health(tmp_path, timeline, "--json").stdout)["gpus"]
    assert (gpu["name"], gpu["uuid"], gpu["pci_bus_id"], gpu["cuda"], gpu["processes"]) == (
        fake_nvml.NAME,
        "n/a",
        "n/a",
        "n/a",
        None,
    )
    assert gpu["state"] == "fatal" and gpu["signals"]["temperature"] == 50


def _register(sock: str, pid: int, **fields) -> None:
    link = DaemonLink(open_socket(sock), sock, os.getpid())
    try:
        assert link.request(Register(pid=pid, **fields)).ok
    finally:
        link.close()


def _metrics(port: int, until) -> dict[str, list[dict]]:
    """Each metric's series (their labels) once ``until(series)`` holds, or after 20 s."""
    from prometheus_client.parser import text_string_to_metric_families

    deadline = time.monotonic() + 20
    while True:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            text = ""
        series: dict[str, list[dict]] = {"ckptd_gpu_job": [], "ckptd_gpu_info": []}
        for family in text_string_to_metric_families(text):
            series[family.name] = [s.labels for s in family.samples if s.value == 1]
        if until(series) or time.monotonic() > deadline:
            return series
        time.sleep(0.3)


def test_status_and_metrics_say_which_job_uses_which_gpu():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seen = subprocess.Popen(["sleep", "120"])  # NVML sees it computing on GPU 0; it registered no device
    declared = subprocess.Popen(["sleep", "120"])  # registered with device 1; NVML does not list it
    d = DaemonProc(
        {"gpus": 2, "events": [{"t": 0, "gpu": 0, "set": {"processes": [seen.pid]}}]},
        args=("--metrics-port", str(port)),
    )
    try:
        _register(d.socket, seen.pid, rank=0, job="job-seen")
        _register(d.socket, declared.pid, rank=3, devices=(1,), job="job-declared")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not status_of(d.socket)["gpus"]:  # the first poll
            time.sleep(0.2)
        gpus = status_of(d.socket)["gpus"]
        assert [g["jobs"] for g in gpus] == [
            [{"job": "job-seen", "pid": seen.pid, "rank": 0}],
            [{"job": "job-declared", "pid": declared.pid, "rank": 3}],
        ]
        out = subprocess.run(
            [sys.executable, "-m", "ckptd.cli", "status", "--socket", d.socket],
            capture_output=True,
            text=True,
            env=d.env,
            timeout=60,
        ).stdout
        assert "driver 550.54.15, CUDA 12.4" in out and fake_nvml.uuid(1) in out and fake_nvml.bus_id(0) in out
        assert f"job-declared rank 3 (pid {declared.pid})" in out and f"job-seen rank 0 (pid {seen.pid})" in out
        info = {
            "gpu": "1",
            "name": fake_nvml.NAME,
            "uuid": fake_nvml.uuid(1),
            "pci_bus_id": fake_nvml.bus_id(1),
            "driver": "550.54.15",
            "cuda": "12.4",
        }
        seen_on_0 = {"gpu": "0", "uuid": fake_nvml.uuid(0), "job": "job-seen", "pid": str(seen.pid), "rank": "0"}
        series = _metrics(port, lambda m: seen_on_0 in m["ckptd_gpu_job"])
        assert info in series["ckptd_gpu_info"] and seen_on_0 in series["ckptd_gpu_job"], series
        seen.kill()
        seen.wait()
        series = _metrics(port, lambda m: len(m["ckptd_gpu_job"]) == 1)
        assert [s["job"] for s in series["ckptd_gpu_job"]] == ["job-declared"], "a job that left leaves no series"
    finally:
        for p in (seen, declared):
            p.kill()
            p.wait()
        d.stop()
