"""Transparent mode: real CRIU dumping and restoring real, unmodified training processes.

Skipped, with the reason, only where CRIU >= 4 cannot be found or the tests do not run as root.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from ckptd.errors import IncompatibleSnapshot, TransparentRefused
from ckptd.process.criu import Criu, missing_privileges, parse_version
from ckptd.process.gpu import gpu_tools

JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_transparent_job.py")
STEPS = ["--steps", "200", "--sleep", "0.04"]


def _criu_here() -> str | None:
    """Why these tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "transparent mode needs root: CRIU dumps and restores other processes"
    try:
        Criu.find()
    except TransparentRefused as e:
        if "found none" in str(e) or "needs >= 4" in str(e):
            return f"no CRIU >= 4 here (bash scripts/install.sh builds it): {e}"
        raise
    return None


needs_criu = pytest.mark.skipif(_criu_here() is not None, reason=str(_criu_here()))


@pytest.fixture(autouse=True)
def drop_images_of_passed_tests(request, tmp_path):
    """A torch job's images are ~200 MB each: a test that passed leaves none behind (a failed one keeps its)."""
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed == failed:
        import shutil

        shutil.rmtree(tmp_path, ignore_errors=True)


def job(out: str, *extra: str) -> list[str]:
    return [sys.executable, JOB, "--out", out, *STEPS, *extra]


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptd.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def start(tmp_path, *args: str, env: dict | None = None, name: str = "run") -> subprocess.Popen:
    """ckptd run in the background, its stdout and stderr into files (``<name>.out``, ``<name>.err``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "ckptd.cli", "run", *args],
        stdout=open(tmp_path / f"{name}.out", "w"),
        stderr=open(tmp_path / f"{name}.err", "w"),
        env=None if env is None else {**os.environ, **env},
    )


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def images(root) -> list[str]:
    """Committed images in a local tier, oldest first."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if n.startswith("step-") and os.path.exists(f"{root}/{n}/ckptd.json"))


def job_pid(run: subprocess.Popen) -> int | None:
    """The job's root process: a child of ckptd run (its subreaper) running the job script."""
    try:
        kids = psutil.Process(run.pid).children()
    except psutil.NoSuchProcess:
        return None
    for p in kids:
        try:
            if JOB in p.cmdline():
                return p.pid
        except psutil.Error:
            continue
    return None


def same_weights(a: str, b: str) -> None:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The job's weights after an uninterrupted run, without ckptd."""
    out = str(tmp_path_factory.mktemp("ref") / "final.pt")
    subprocess.run(job(out), check=True, capture_output=True, timeout=300)
    return out


@needs_criu
def test_a_job_killed_after_an_image_is_restored_and_ends_bitwise_equal(reference, tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "final.pt")
    run = start(tmp_path, "--transparent", "--store", store, "--interval", "2", "--backoff", "0.1", "--", *job(out))
    try:
        wait_for(lambda: images(store), 120, "a first image")
        pid = wait_for(lambda: job_pid(run), 10, "the job's pid")
        os.kill(pid, signal.SIGKILL)
        assert run.wait(timeout=240) == 0
    finally:
        run.kill()
    err, stdout = (tmp_path / "run.err").read_text(), (tmp_path / "run.out").read_text()
    assert "killed by SIGKILL" in err and "restored job" in err, err[-3000:]
    assert "completed" in err and "1 restarts" in err
    assert "done" in stdout and "job stderr reaches ckptd run" in err  # both pipes survived the restore
    same_weights(reference, out)
    # the images are snapshots like any other: listed, inspected, verified
    ls = cli("ls", store, "--json")
    assert ls.returncode == 0 and '"kind": "process"' in ls.stdout
    inspect = cli("inspect", store)
    assert inspect.returncode == 0 and "kind: process" in inspect.stdout and JOB in inspect.stdout
    verify = cli("verify", store, "--all")
    assert verify.returncode == 0 and "CORRUPT" not in verify.stdout, verify.stdout


@needs_criu
def test_run_and_job_killed_then_resumed_from_s3_on_an_empty_local_tier(reference, tmp_path, bucket):
    uri, out, sock = f"s3://{bucket}/job", str(tmp_path / "final.pt"), str(tmp_path / "d.sock")
    first = {"CKPTD_LOCAL": str(tmp_path / "node-a")}
    run = start(
        tmp_path, "--transparent", "--store", uri, "--socket", sock, "--interval", "2", "--", *job(out), env=first
    )
    try:
        from ckptd.restore.find import list_snapshots
        from ckptd.store import open_store

        remote = open_store(uri)
        wait_for(lambda: [i for i in list_snapshots(remote) if i.committed], 180, "an image durable in S3")
        pid = wait_for(lambda: job_pid(run), 10, "the job's pid")
        os.kill(run.pid, signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        run.wait(timeout=30)
        second = {"CKPTD_LOCAL": str(tmp_path / "node-b")}  # another machine: nothing local
        res = cli("run", "--transparent", "--store", uri, "--socket", sock, "--", *job(out), env=second)
    finally:
        run.kill()
        _stop_daemon(sock)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "restored job" in res.stderr and "done" in res.stdout
    assert images(str(tmp_path / "node-b") + "/" + os.listdir(tmp_path / "node-b")[0])  # downloaded there
    same_weights(reference, out)


def _stop_daemon(sock: str) -> None:
    from ckptd.daemon.client import status_of

    try:
        pid = status_of(sock)["pid"]
    except OSError:
        return
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 60, "the daemon")


@needs_criu
def test_pause_exits_75_and_the_same_command_resumes_bitwise(reference, tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "final.pt")
    cmd = ["--transparent", "--store", store, "--interval", "1000", "--", *job(out)]
    env = {"CKPTD_JOB": f"pause-{os.getpid()}"}
    run = start(tmp_path, *cmd, env=env)
    try:
        wait_for(lambda: "step 20 " in (tmp_path / "run.out").read_text(), 120, "20 steps of training")
        paused = cli("pause", env["CKPTD_JOB"])
        assert paused.returncode == 0, paused.stderr
        assert run.wait(timeout=60) == 75
    finally:
        run.kill()
    assert "paused" in (tmp_path / "run.err").read_text() and not os.path.exists(out)
    assert len(images(store)) == 1
    res = cli("run", *cmd, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "restored job" in res.stderr
    assert "step 0 " not in res.stdout and "done" in res.stdout  # it went on, it did not start over
    same_weights(reference, out)


@needs_criu
def test_a_corrupt_image_is_detected_and_the_older_one_restored(reference, tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "final.pt")
    cmd = ["--transparent", "--store", store, "--interval", "1.5", "--", *job(out)]
    env = {"CKPTD_JOB": f"corrupt-{os.getpid()}"}
    run = start(tmp_path, *cmd, env=env)
    try:
        wait_for(lambda: len(images(store)) >= 2, 120, "two images")
        assert cli("pause", env["CKPTD_JOB"]).returncode == 0
        assert run.wait(timeout=60) == 75
    finally:
        run.kill()
    newest = images(store)[-1]
    pages = next(n for n in os.listdir(f"{store}/{newest}") if n.startswith("pages-"))
    with open(f"{store}/{newest}/{pages}", "r+b") as f:
        f.seek(os.path.getsize(f.name) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cli("verify", store).returncode == 1
    res = cli("run", *cmd, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipping {newest}" in res.stderr and "does not verify" in res.stderr
    assert "restored job" in res.stderr
    same_weights(reference, out)


def test_criu_absent_is_one_clear_error_and_the_job_never_starts(tmp_path):
    marker = tmp_path / "ran"
    res = cli(
        "run",
        "--transparent",
        "--store",
        str(tmp_path / "s"),
        "--",
        sys.executable,
        "-c",
        f"open({str(marker)!r}, 'w')",
        env={"CKPTD_CRIU": "/nonexistent"},
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "CKPTD_CRIU=/nonexistent" in lines[0] and "CRIU >= 4" in lines[0] and "ckptd.Checkpointer" in lines[0]
    assert not marker.exists() and not (tmp_path / "s").exists()


@needs_criu
def test_a_connection_to_another_host_is_refused_naming_the_hook(tmp_path):
    host = next(
        (
            a.address
            for addrs in psutil.net_if_addrs().values()
            for a in addrs
            if a.family == socket.AF_INET and not a.address.startswith("127.")
        ),
        None,
    )
    if host is None:
        pytest.skip("this machine has no non-loopback IPv4 address to play the other host")
    listener = socket.create_server((host, 0))
    port = listener.getsockname()[1]
    code = f"import socket, time; s = socket.create_connection(({host!r}, {port})); print('connected', flush=True); time.sleep(120)"
    try:
        res = cli(
            "run", "--transparent", "--store", str(tmp_path / "s"), "--grace", "1", "--", sys.executable, "-c", code
        )
        peer, _ = listener.accept()
        peer.settimeout(10)
        assert peer.recv(1) == b""  # the job is gone
    finally:
        listener.close()
    assert res.returncode == 2, res.stderr
    assert f"TCP connection (ESTABLISHED) to {host}:{port}" in res.stderr
    assert "ckptd.Checkpointer" in res.stderr
    assert not images(str(tmp_path / "s"))


@needs_criu
def test_missing_privileges_are_refused_before_the_job_starts(tmp_path):
    if not os.path.exists("/usr/bin/setpriv"):
        pytest.skip("setpriv (util-linux) is needed to drop capabilities")
    marker = tmp_path / "ran"
    res = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-sys_admin,-checkpoint_restore",
            sys.executable,
            "-m",
            "ckptd.cli",
            "run",
            "--transparent",
            "--store",
            str(tmp_path / "s"),
            "--",
            sys.executable,
            "-c",
            f"open({str(marker)!r}, 'w')",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2, res.stderr
    assert "needs root or CAP_SYS_ADMIN, CAP_CHECKPOINT_RESTORE" in res.stderr and "ckptd.Checkpointer" in res.stderr
    assert not marker.exists()


@needs_criu
def test_kinds_do_not_mix_each_refuses_the_other_in_one_line(tmp_path):
    import ckptd

    images_store, out = str(tmp_path / "process"), str(tmp_path / "o.pt")
    env = {"CKPTD_JOB": f"kinds-{os.getpid()}"}
    run = start(tmp_path, "--transparent", "--store", images_store, "--interval", "1000", "--", *job(out), env=env)
    try:
        wait_for(lambda: "step 1 " in (tmp_path / "run.out").read_text(), 120, "the job to train")
        assert cli("pause", env["CKPTD_JOB"]).returncode == 0
        assert run.wait(timeout=60) == 75
    finally:
        run.kill()
    with pytest.raises(IncompatibleSnapshot, match="is a process image of `ckptd run --transparent`"):
        ckptd.load(images_store)
    tensors = str(tmp_path / "tensor")
    model = torch.nn.Linear(2, 2)
    with ckptd.Checkpointer(tensors, model=model, policy="every:1") as ckpt:
        ckpt.step(0)
    res = cli("run", "--transparent", "--store", tensors, "--", *job(out))
    assert res.returncode == 2
    assert "is a tensor snapshot of the hook (ckptd.Checkpointer), not a process image" in res.stderr


# -- the parts, on their own ------------------------------------------------------------------


def test_criu_versions_and_privileges_are_read_as_criu_and_the_kernel_print_them():
    assert parse_version("Version: 4.2\nGitID: v4.2\n") == (4, 2)
    assert parse_version("Version: 3.17.1\n") == (3, 17, 1) < (4, 0)
    assert parse_version("criu: command not found") == ()
    full = "CapEff:\t000001ffffffffff\n"
    assert missing_privileges(full, 40) == []
    assert missing_privileges("CapEff:\t000000fffedfffff\n", 40) == ["CAP_SYS_ADMIN", "CAP_CHECKPOINT_RESTORE"]
    assert missing_privileges("CapEff:\t000000fffedfffff\n", 39) == ["CAP_SYS_ADMIN"]  # a kernel before 5.9


def test_gpu_jobs_say_in_one_line_which_piece_is_missing(tmp_path):
    driver = tmp_path / "version"
    tools = tmp_path / "bin"
    tools.mkdir()
    plugins = tmp_path / "lib"
    plugins.mkdir()

    def refused(**kw) -> str:
        with pytest.raises(TransparentRefused) as e:
            gpu_tools(str(plugins), environ={"PATH": str(tools)}, driver_file=str(driver), **kw)
        assert "\n" not in str(e.value) and "ckptd.Checkpointer" in str(e.value)
        return str(e.value)

    assert "names no driver" in refused()
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    assert "driver 535.104.05 is too old" in refused() and "r555" in refused()
    driver.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build\n")
    assert "cuda-checkpoint is not on PATH" in refused()
    fake = tools / "cuda-checkpoint"
    fake.write_text("#!/bin/sh\necho 'usage: cuda-checkpoint --toggle --pid PID'\n")
    fake.chmod(0o755)
    assert "has no --action" in refused()
    fake.write_text("#!/bin/sh\necho 'usage: cuda-checkpoint --action lock|checkpoint|restore|unlock --pid PID'\n")
    assert "cuda_plugin.so" in refused()
    (plugins / "cuda_plugin.so").write_bytes(b"")
    found = gpu_tools(str(plugins), environ={"PATH": str(tools)}, driver_file=str(driver))
    assert found.driver == "570.86.15" and found.cuda_checkpoint == str(fake)


TCP_JOB = """
import socket, sys, time
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname())
peer, _ = server.accept()
total = 0
for i in range(150):
    client.sendall(i.to_bytes(4, "little"))
    total += int.from_bytes(peer.recv(4), "little")
    print("sent", i, flush=True)
    time.sleep(0.04)
open(sys.argv[1], "w").write(str(total))
"""


@needs_criu
def test_a_tcp_connection_inside_the_job_survives_a_restore(tmp_path):
    store, out = str(tmp_path / "store"), str(tmp_path / "total")
    run = start(
        tmp_path, "--transparent", "--store", store, "--interval", "1.5", "--backoff", "0.1", "--",
        sys.executable, "-c", TCP_JOB, out,
    )  # fmt: skip
    try:
        wait_for(lambda: images(store), 60, "a first image")
        pid = wait_for(lambda: _child_running(run, "create_server"), 10, "the job's pid")
        os.kill(pid, signal.SIGKILL)
        assert run.wait(timeout=120) == 0, (tmp_path / "run.err").read_text()[-3000:]
    finally:
        run.kill()
    assert "restored job" in (tmp_path / "run.err").read_text()
    with open(out) as f:
        assert f.read() == str(sum(range(150)))  # every number crossed the restored connection once


def _child_running(run: subprocess.Popen, text: str) -> int | None:
    try:
        return next((p.pid for p in psutil.Process(run.pid).children() if text in " ".join(p.cmdline())), None)
    except psutil.Error:
        return None


COUNTER = "import time\nfor i in range(10**6):\n    print(i, flush=True)\n    time.sleep(0.05)\n"


@needs_criu
def test_the_policy_a_degraded_gpu_and_sigterm_each_bring_an_image(tmp_path):
    """No --interval: a first image measures the freeze, then the interval is minutes long; the daemon's
    risk signal (fake NVML: ECC errors on GPU 0) brings one at once, and SIGTERM a last one before exit 75."""
    import json

    marker, timeline = tmp_path / "degrade", tmp_path / "timeline.json"
    timeline.write_text(
        json.dumps({"gpus": 1, "events": [{"when_exists": str(marker), "gpu": 0, "set": {"ecc_corrected": 5000}}]})
    )
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {
        "CKPTD_NVML_MODULE": "fake_nvml",
        "FAKE_NVML_TIMELINE": str(timeline),
        "PYTHONPATH": tests + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    store, sock = str(tmp_path / "store"), str(tmp_path / "d.sock")
    t0 = time.monotonic()
    run = start(
        tmp_path, "--transparent", "--store", store, "--socket", sock, "--", sys.executable, "-c", COUNTER, env=env
    )
    try:
        wait_for(lambda: images(store), 90, "the first image, which measures the freeze")
        assert time.monotonic() - t0 >= 9.5  # not before the job ran first_after (10 s)
        time.sleep(4)
        assert len(images(store)) == 1, "the policy's interval after a cheap first image is minutes long"
        marker.touch()
        t1 = time.monotonic()
        wait_for(lambda: len(images(store)) == 2, 30, "an image after GPU 0 degraded")
        assert time.monotonic() - t1 < 20
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 75
    finally:
        run.kill()
    err = (tmp_path / "run.err").read_text()
    assert len(images(store)) == 3 and "preempted" in err, err[-2000:]
