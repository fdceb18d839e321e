"""The sidecar daemon as a real process beside a real trainer, with a scripted fake NVML."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest
from _trainer import run_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptd
from ckptd.daemon.client import status_of
from ckptd.daemon.protocol import MAX_FRAME, Status, encode

TESTS = os.path.dirname(os.path.abspath(__file__))


class DaemonProc:
    """`ckptd daemon` in a subprocess with a fake NVML timeline."""

    def __init__(
        self,
        timeline: dict | None = None,
        *,
        store: str | None = None,
        extra_env: dict | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix="ckd-", dir="/tmp")
        self.socket = os.path.join(self.dir, "d.sock")
        tl = os.path.join(self.dir, "timeline.json")
        with open(tl, "w") as f:
            json.dump(timeline or {"gpus": 2, "events": []}, f)
        self.env = {
            **os.environ,
            "CKPTD_NVML_MODULE": "fake_nvml",
            "FAKE_NVML_TIMELINE": tl,
            "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "CKPTD_SOCKET": self.socket,
            **(extra_env or {}),
        }
        cmd = [sys.executable, "-m", "ckptd.cli", "daemon", "--socket", self.socket, "--poll", "0.2", *args]
        if store:
            cmd += ["--store", store]
        self.log = open(os.path.join(self.dir, "daemon.log"), "w+")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.socket):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.01)
        self.ready_s = time.monotonic() - self.t0

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def state(self) -> dict:
        with open(self.socket + ".state.json") as f:
            return json.load(f)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture
def daemon_factory():
    started = []

    def make(*a, **kw) -> DaemonProc:
        d = DaemonProc(*a, **kw)
        started.append(d)
        return d

    yield make
    for d in started:
        d.stop()


def trainer_env(d: DaemonProc) -> dict:
    return {"CKPTD_SOCKET": d.socket}


def test_daemon_starts_fast_stays_small_and_never_loads_torch(daemon_factory):
    d = daemon_factory({"missing": True})
    assert d.ready_s < 3.0
    time.sleep(1.0)
    with open(f"/proc/{d.proc.pid}/maps") as f:
        maps = f.read()
    assert "libtorch" not in maps and "torch/lib" not in maps
    import psutil

    p = psutil.Process(d.proc.pid)
    rss = p.memory_info().rss
    cpu0 = sum(p.cpu_times()[:2])
    time.sleep(2.0)
    idle = (sum(p.cpu_times()[:2]) - cpu0) / 2.0
    print(f"daemon: ready in {d.ready_s:.2f} s, RSS {rss / 2**20:.0f} MiB, idle CPU {idle * 100:.1f}%")
    assert rss < 150 * 2**20 and idle < 0.2
    st = status_of(d.socket)
    assert st["nvml"].startswith("NVMLError_LibraryNotFound") and st["gpus"] == []


def test_socket_is_0600_and_refuses_another_uid(daemon_factory):
    d = daemon_factory()
    assert os.stat(d.socket).st_mode & 0o777 == 0o600
    code = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print('refused', e.errno); sys.exit(0)\n"
        "print('connected'); sys.exit(1)"
    )
    out = subprocess.run([sys.executable, "-c", code, d.socket], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "refused" in out.stdout, out.stdout + out.stderr
    os.chmod(d.socket, 0o666)  # even with the file mode opened, the peer uid check refuses
    os.chmod(os.path.dirname(d.socket), 0o755)
    code2 = (
        "import os, socket, sys\n"
        "frame = bytes.fromhex(sys.argv[2])\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(frame)\n"
        "print(s.recv(65536))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code2, d.socket, encode(Status()).hex()], capture_output=True, text=True, timeout=30
    )
    assert "may not talk to this daemon" in out.stdout, out.stdout + out.stderr


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    frame=st.one_of(
        st.binary(max_size=300).map(lambda b: len(b).to_bytes(4, "big") + b),
        st.binary(max_size=40),
        st.integers(MAX_FRAME + 1, 2**32 - 1).map(lambda n: n.to_bytes(4, "big")),
        st.dictionaries(
            st.sampled_from(["v", "type", "pid", "step", "devices", "path", "store", "step_time"]),
            st.one_of(st.none(), st.integers(-5, 5), st.text(max_size=8), st.lists(st.integers(-1, 3))),
        ).map(lambda d: (lambda b: len(b).to_bytes(4, "big") + b)(json.dumps(d).encode())),
    )
)
def test_fuzzed_frames_never_crash_the_daemon(fuzz_daemon, frame):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(fuzz_daemon.socket)
    try:
        s.sendall(frame)
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    except OSError:
        pass
    finally:
        s.close()
    assert fuzz_daemon.proc.poll() is None
    assert status_of(fuzz_daemon.socket)["pid"] == fuzz_daemon.proc.pid


@pytest.fixture(scope="module")
def fuzz_daemon():
    d = DaemonProc()
    yield d
    d.stop()


def test_fatal_xid_stops_the_job_after_an_emergency_snapshot(daemon_factory, tmp_path):
    d = daemon_factory({"gpus": 2, "events": [{"t": 6.0, "gpu": 1, "xid": 79}]}, args=("--grace", "20"))
    store = str(tmp_path / "store")
    run = run_trainer(
        store, "--steps", "100000", "--policy", "every:100000", "--step-sleep", "0.02", env=trainer_env(d), timeout=90
    )
    assert run.returncode == 75, "\n".join(run.lines[-15:]) + d.output()
    assert d.state()["bad_gpus"] == {"1": "XID 79 (reset or reboot required)"}
    infos = ckptd.list_snapshots(store)
    assert infos and infos[-1].committed, "the emergency snapshot must be committed before the job stops"
    assert "stop job" in d.output() and "fatal fault on GPU 1" in d.output()


def test_degraded_gpu_raises_risk_and_snapshots_sooner(daemon_factory, tmp_path):
    d = daemon_factory({"gpus": 1, "events": [{"t": 8.0, "gpu": 0, "set": {"ecc_corrected": 5000}}]})
    store = str(tmp_path / "store")
    run = run_trainer(
        store,
        "--steps",
        "100000",
        "--policy",
        "adaptive",
        "--step-sleep",
        "0.02",
        env=trainer_env(d),
        kill_on=r"snapshot requested: GPU 0 degraded",
        kill_delay=3.0,
        timeout=60,
    )
    assert run.killed_after is not None, "\n".join(run.lines[-10:]) + d.output()
    requested = next(i for i, line in enumerate(run.lines) if "snapshot requested" in line)
    before = [line for line in run.lines[:requested] if line.endswith(": committed")]
    after = [line for line in run.lines[requested:] if line.endswith(": committed")]
    # The first snapshot measures the cost and the adaptive interval is then minutes long;
    # the ECC spike raises the risk and brings a snapshot at once.
    assert len(before) == 1 and after, run.lines
    assert "gpu degraded" in d.output()


def test_hang_dumps_stacks_and_stops_the_job(daemon_factory, tmp_path):
    d = daemon_factory(args=("--hang-floor", "2", "--hang-factor", "5", "--grace", "3"))
    run = run_trainer(
        str(tmp_path / "store"),
        "--steps",
        "1000",
        "--policy",
        "every:1000",
        "--step-sleep",
        "0.02",
        "--hang-at",
        "30",
        env=trainer_env(d),
        timeout=60,
    )
    assert run.returncode == -signal.SIGKILL, "\n".join(run.lines[-10:])
    text = "\n".join(run.lines)
    assert "most recent call first" in text and "train.py" in text, "faulthandler must dump the stacks"
    assert "hang" in d.output()


def test_snapshot_reaches_s3_although_the_trainer_dies_right_after_commit(daemon_factory, s3env, tmp_path):
    bucket = s3env.make_bucket()
    uri = f"s3://{bucket}/run"
    d = daemon_factory(extra_env=s3env.env())
    env = {**s3env.env(), **trainer_env(d), "CKPTD_LOCAL": str(tmp_path / "tier")}
    run = run_trainer(
        uri,
        "--steps",
        "100000",
        "--policy",
        "every:10",
        "--width",
        "512",
        "--step-sleep",
        "0.01",
        env=env,
        kill_on=r"step 19: committed",
        timeout=60,
    )
    assert run.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if 19 in [i.step for i in ckptd.list_snapshots(uri) if i.committed]:
            break
        time.sleep(0.2)
    assert 19 in [i.step for i in ckptd.list_snapshots(uri) if i.committed], d.output()
    assert not [i for i in ckptd.list_snapshots(str(tmp_path / "tier")) if not i.committed]
    secret = s3env.env()["AWS_SECRET_ACCESS_KEY"]
    assert secret not in d.output() and secret not in "\n".join(run.lines)


def test_bad_credentials_fail_in_one_line_without_the_secret(s3env, tmp_path):
    bucket = s3env.make_bucket()
    env = {
        **s3env.env(),
        "AWS_SECRET_ACCESS_KEY": "fake-secret-must-not-leak",
        "AWS_SESSION_TOKEN": "fake-token-must-not-leak",
    }
    run = run_trainer(f"s3://{bucket}/run", "--steps", "5", env=env, timeout=60)
    assert run.returncode != 0
    text = "\n".join(run.lines)
    assert "denied" in text and "fake-secret-must-not-leak" not in text and "fake-token-must-not-leak" not in text


def test_relaunch_leaves_out_the_gpu_the_daemon_marked_bad(tmp_path):
    """ckptd run starts its daemon (fake NVML: XID 79 on GPU 1); the relaunch runs without GPU 1."""
    sock_dir = tempfile.mkdtemp(prefix="ckr-", dir="/tmp")
    timeline = os.path.join(sock_dir, "timeline.json")
    with open(timeline, "w") as f:
        json.dump({"gpus": 2, "events": [{"t": 7.0, "gpu": 1, "xid": 79}]}, f)
    env = {
        **os.environ,
        "CKPTD_NVML_MODULE": "fake_nvml",
        "FAKE_NVML_TIMELINE": timeline,
        "PYTHONPATH": TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "CKPTD_SOCKET": os.path.join(sock_dir, "d.sock"),
    }
    from _trainer import TRAIN

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptd.cli",
            "run",
            "--store",
            str(tmp_path / "s"),
            "--gpus",
            "0,1",
            "--backoff",
            "0.1",
            "--grace",
            "20",
            "--",
            sys.executable,
            TRAIN,
            "--steps",
            "400",
            "--policy",
            "every:50",
            "--step-sleep",
            "0.03",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    starts = [line for line in res.stderr.splitlines() if line.startswith("starting at step")]
    assert len(starts) == 2, res.stderr[-3000:]
    assert starts[0].endswith("(CUDA_VISIBLE_DEVICES=0,1)") and starts[1].endswith("(CUDA_VISIBLE_DEVICES=0)")
    assert "preempted (exit 75)" in res.stderr and "1 restarts" in res.stderr
    assert not starts[1].startswith("starting at step 0 ")


def test_metrics_are_served_on_localhost(daemon_factory):
    import socket as so
    import urllib.request

    with so.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon_factory({"gpus": 2, "events": [{"t": 0.5, "gpu": 1, "xid": 79}]}, args=("--metrics-port", str(port)))
    deadline = time.monotonic() + 20
    text = ""
    while time.monotonic() < deadline and 'ckptd_gpu_health{gpu="1"} 3.0' not in text:
        time.sleep(0.3)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
        except OSError:
            continue
    assert 'ckptd_gpu_health{gpu="1"} 3.0' in text and "ckptd_bad_gpus 1.0" in text, text[-2000:]
    assert "ckptd_upload_backlog" in text


@pytest.mark.parametrize("phase", [r"step 9: committed", r"step 19: staging", r"step 29: staged, writing"])
def test_daemon_killed_mid_upload_the_trainer_takes_over(daemon_factory, s3env, tmp_path, phase):
    bucket = s3env.make_bucket()
    uri = f"s3://{bucket}/run"
    d = daemon_factory(extra_env=s3env.env())
    env = {**s3env.env(), **trainer_env(d), "CKPTD_LOCAL": str(tmp_path / "tier")}
    run = run_trainer(
        uri,
        "--steps",
        "60",
        "--policy",
        "every:10",
        "--width",
        "512",
        "--step-sleep",
        "0.02",
        env=env,
        kill_on=phase,
        on_match=lambda: os.kill(d.proc.pid, signal.SIGKILL),
        timeout=120,
    )
    assert run.killed_after is not None and d.proc.wait(timeout=10) == -signal.SIGKILL
    # close() returned without error, so every snapshot became durable, those the daemon had included.
    assert run.returncode == 0, "\n".join(run.lines[-20:])
    assert any("lost the daemon" in line for line in run.lines)
    assert [i.step for i in ckptd.list_snapshots(uri) if i.committed] == [39, 49, 59]


def test_deleted_file_is_detected_and_the_previous_snapshot_used(tmp_path):
    from test_snapshot import ckpt_for, make, run

    run(tmp_path, 6)
    os.unlink(tmp_path / "step-000000000005" / "__0_0.distcp")
    model, opt, sched, counter = make(seed=3)
    with ckpt_for(tmp_path, model, opt, sched, counter) as ck:
        with pytest.warns(UserWarning, match="__0_0.distcp: missing"):
            assert ck.restore() == 4


def test_faults_the_daemon_stopped_a_job_for_reach_its_next_launch_policy(tmp_path, monkeypatch):
    import threading

    from ckptd.daemon.protocol import Register
    from ckptd.daemon.service import Daemon, DaemonConfig

    monkeypatch.setenv("CKPTD_NVML_MODULE", "fake_nvml")
    monkeypatch.setenv("PYTHONPATH", TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    sock = tempfile.mkdtemp(prefix="ckd-", dir="/tmp") + "/d.sock"
    d = Daemon(DaemonConfig(socket=sock, poll=0.2))
    victims = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        for rank, v in enumerate(victims):  # two ranks of one job, stopped for one fault: one failure
            d.handle(Register(pid=v.pid, rank=rank, job="job-a", world_size=2), v.pid)
        for v in victims:
            d._stop_job(d.jobs[v.pid], "fatal fault on GPU 0")
        assert d.faults == {"job-a": 1}
    finally:
        for v in victims:
            v.kill()
            v.wait()
    th = threading.Thread(target=d.run, daemon=True)
    th.start()
    try:
        import torch

        monkeypatch.setenv("CKPTD_SOCKET", sock)
        monkeypatch.setenv("CKPTD_JOB", "job-a")
        monkeypatch.setenv("CKPTD_RESTARTS", "1")  # `ckptd run` saw the same failure as a restart
        ck = ckptd.Checkpointer(str(tmp_path / "s"), model=torch.nn.Linear(2, 2))
        assert ck.policy.rate.failures == 1
        d.faults["job-a"] = 3  # as if two more faults had stopped earlier launches
        d.handle(Register(pid=os.getpid(), job="job-a"), os.getpid())
        ck.step(0)
        assert ck.policy.rate.failures == 3
        ck.close()
    finally:
        d.stop()
        th.join(timeout=30)


def test_status_names_the_daemon_log_file(daemon_factory, tmp_path):
    log = str(tmp_path / "daemon.log")
    d = daemon_factory(args=("--log", log))
    out = subprocess.run(
        [sys.executable, "-m", "ckptd.cli", "status", "--socket", d.socket],
        capture_output=True,
        text=True,
        env=d.env,
        timeout=60,
    ).stdout
    assert f"daemon log: {log}" in out
    with open(log) as f:
        assert "listening on" in f.read()
    assert "listening on" not in d.output()


WAIT_THEN_TRAIN = """
import os, sys, time
while not os.path.exists(sys.argv[1]):  # this process exists before the fault; it registers after it
    time.sleep(0.02)
sys.argv = [sys.argv[2], *sys.argv[3:]]
exec(compile(open(sys.argv[0]).read(), sys.argv[0], "exec"), {"__name__": "__main__"})
"""


@pytest.mark.parametrize("started", ["before the fault", "after the fault"])
def test_a_job_registering_after_its_gpu_went_bad(daemon_factory, tmp_path, started):
    """A job whose process is older than a fatal XID but registers after it (a slow start) is stopped as if
    it had registered in time; one started after it (ckptd run's relaunch without that GPU) is left to run."""
    from _trainer import TRAIN

    cue, go = tmp_path / "fault-now", tmp_path / "go"
    d = daemon_factory({"gpus": 2, "events": [{"when_exists": str(cue), "gpu": 1, "xid": 79}]}, args=("--grace", "20"))
    args = ["--store", str(tmp_path / "store"), "--steps", "60", "--policy", "every:100000", "--step-sleep", "0.02"]
    env = {**os.environ, **trainer_env(d)}
    if started == "after the fault":
        cue.touch()
        deadline = time.monotonic() + 30
        while "gpu bad" not in d.output():
            assert time.monotonic() < deadline, d.output()
            time.sleep(0.05)
    proc = subprocess.Popen(
        [sys.executable, "-c", WAIT_THEN_TRAIN, str(go), TRAIN, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if started == "before the fault":
        time.sleep(0.2)
        cue.touch()
        deadline = time.monotonic() + 30
        while "gpu bad" not in d.output():
            assert time.monotonic() < deadline, d.output()
            time.sleep(0.05)
    go.touch()
    _, err = proc.communicate(timeout=120)
    if started == "before the fault":
        assert proc.returncode == 75, err[-2000:] + d.output()
        assert "fatal fault on GPU 1 before it registered" in d.output()
    else:
        assert proc.returncode == 0, err[-2000:] + d.output()
        assert "stop job" not in d.output()


def test_the_daemon_is_told_the_physical_gpu_of_a_cuda_device():
    from ckptd.hook import physical_gpus

    assert physical_gpus(0, None) == (0,)
    assert physical_gpus(1, "2,3") == (3,)
    assert physical_gpus(0, " 5 , 7") == (5,)
    assert physical_gpus(0, "GPU-8d2c1a4e-0000") == ()  # by UUID: every GPU, conservatively
    assert physical_gpus(2, "0,1") == ()
