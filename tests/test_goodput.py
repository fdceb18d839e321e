"""The goodput ledger: its gate against hostile pages, its accounting, and a real job that fails and is paid for."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter

import psutil
import pytest
from _trainer import ROOT, TRAIN
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptd.errors import LedgerCorrupt
from ckptd.ledger.account import account
from ckptd.ledger.book import LedgerBook, LedgerReader, page_key
from ckptd.ledger.energy import EnergyMeter, GpuEnergy
from ckptd.ledger.record import MAX_PAGE_BYTES, Record, parse_page
from ckptd.policy import PolicyContext, RiskAwarePolicy
from ckptd.store.file import FileStore

TESTS = os.path.dirname(os.path.abspath(__file__))
T = 1.8e9  # a time in the ledger's range
KEY = ".ckptd/ledger/job-1/1800000000000-hook-0123abcd-000000.json"


def page(records: list[dict], **top) -> bytes:
    body = {"format": "ckptd-ledger/1", "job": "job-1", "source": "hook", "records": records, **top}
    return json.dumps(body).encode()


TRAIN_REC = {"kind": "train", "pid": 7, "t0": T, "t1": T + 10, "step0": 0, "step1": 9, "steps": 10, "stall_s": 0.5}


def test_a_valid_page_round_trips():
    p = parse_page(page([TRAIN_REC, {"kind": "start", "pid": 7, "t0": T - 3, "t1": T, "gpus": 8}]), source=KEY)
    assert p.job == "job-1" and [r.kind for r in p.records] == ["train", "start"]
    assert parse_page(p.to_json(), source=KEY) == p


def _with(**changes) -> bytes:
    return page([{**TRAIN_REC, **changes}])


HOSTILE = {
    "NaN time": page([TRAIN_REC]).replace(f'"t0": {T}'.encode(), b'"t0": NaN'),
    "infinite stall": page([TRAIN_REC]).replace(b'"stall_s": 0.5', b'"stall_s": Infinity'),
    "overflowing stall": page([TRAIN_REC]).replace(b'"stall_s": 0.5', b'"stall_s": 1e999'),
    "negative duration": _with(t1=T - 1),
    "negative stall": _with(stall_s=-0.1),
    "stall longer than the span and an hour": _with(stall_s=4000.0),
    "steps backwards": _with(step0=9, step1=0),
    "a time in 1970": _with(t0=10.0, t1=20.0),
    "a span of years": _with(t1=T + 400 * 86400),
    "bool as pid": _with(pid=True),
    "float as step": _with(step0=1.5),
    "unknown field": _with(command="rm -rf /"),
    "unknown kind": page([{**TRAIN_REC, "kind": "teleport"}]),
    "a daemon's record in a hook page": page([{"kind": "hang", "pid": 1, "t0": T, "t1": T + 1}]),
    "unknown version": page([TRAIN_REC], format="ckptd-ledger/2"),
    "unknown top-level field": page([TRAIN_REC], extra=1),
    "job that escapes its directory": page([TRAIN_REC], job="../other"),
    "too many records": page([TRAIN_REC] * 1025),
    "huge object": page([TRAIN_REC]) + b" " * MAX_PAGE_BYTES,
    "note too long": json.dumps(
        {
            "format": "ckptd-ledger/1",
            "job": "job-1",
            "source": "run",
            "records": [{"kind": "exit", "pid": 1, "t0": T, "t1": T, "code": 1, "note": "x" * 201}],
        }
    ).encode(),
    "a field of another kind": page([{"kind": "close", "pid": 1, "t0": T, "t1": T, "note": "x"}]),
    "absurd energy": json.dumps(
        {
            "format": "ckptd-ledger/1",
            "job": "job-1",
            "source": "daemon",
            "records": [{"kind": "energy", "pid": 0, "t0": T, "t1": T + 1, "joules": 1e12, "gpus": 1}],
        }
    ).encode(),
    "deep nesting": b'{"records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not JSON": b"\xff\xfe not json",
    "a list": b"[]",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_the_gate_refuses_hostile_pages(name):
    with pytest.raises(LedgerCorrupt) as e:
        parse_page(HOSTILE[name], source=KEY)
    assert KEY in str(e.value) and "\n" not in str(e.value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    records=st.lists(
        st.dictionaries(
            st.sampled_from(["kind", "pid", "t0", "t1", "step0", "step1", "steps", "stall_s", "note", "joules"]),
            json_values | st.sampled_from(["train", "start", "energy", T, T + 5.0, 3]),
        ),
        max_size=4,
    )
)
def test_fuzzed_pages_are_records_or_ledger_corrupt(records):
    try:
        p = parse_page(page(records), source=KEY)
    except LedgerCorrupt:
        return
    for r in p.records:
        assert r.t0 <= r.t1 and r.stall_s >= 0 and r.kind in ("train", "start")


def test_the_reader_skips_bad_pages_with_their_reason_and_reads_the_rest(tmp_path):
    store = FileStore(str(tmp_path))
    book = LedgerBook(store, job="job-1", source="hook")
    book.append(Record(kind="start", pid=7, t0=T - 3, t1=T, gpus=1))
    book.append(Record(kind="train", pid=7, t0=T, t1=T + 10, step0=0, step1=9, steps=10))
    book.close()
    store.put_bytes(page_key("job-1", "hook", "deadbeef", 0, T + 20), HOSTILE["NaN time"])
    store.put_bytes(page_key("job-1", "daemon", "deadbeef", 1, T + 21), page([TRAIN_REC]))  # named the daemon's
    big = store.path_of(page_key("job-1", "hook", "deadbeef", 2, T + 22))
    with open(big, "wb") as f:
        f.truncate(MAX_PAGE_BYTES + 1)  # never fetched: its listed size rules it out
    store.put_bytes(".ckptd/ledger/job-1/notes.txt", b"not a page name: ignored")
    ledger = LedgerReader(store).read()
    assert [r.kind for r in ledger.records()] == ["start", "train"]
    assert len(ledger.problems) == 3, ledger.problems
    assert any("NaN" in p for p in ledger.problems) and any("over" in p for p in ledger.problems)


def rec(kind: str, t0: float, t1: float | None = None, **kw) -> Record:
    pid = kw.pop("pid", 1 if kind in ("run", "launch", "exit", "run_end") else 2)
    return Record(kind=kind, pid=pid, t0=T + t0, t1=T + (t0 if t1 is None else t1), **kw)


def test_every_second_goes_to_one_cause_as_the_records_say():
    """A job under ckptd run: first launch, a SIGKILL 4.9 s after its last snapshot's step, a relaunch."""
    records = [
        rec("run", 0),
        rec("launch", 0.5, attempt=1),
        rec("start", 0.6, 2, gpus=4),
        rec("restored", 2, 3, step=-1),
        rec("train", 3, 13, step0=0, step1=9, steps=10, snapshots=1, nbytes=10**9),
        rec("train", 13, 23, step0=10, step1=19, steps=10, stall_s=0.5, snapshots=1, nbytes=10**9),
        rec("train", 23, 26, step0=20, step1=22, steps=3, stall_s=0.1),  # then killed, unrecorded
        rec("exit", 27.9, 28, attempt=1, code=-9, note="killed by SIGKILL"),
        rec("launch", 29, attempt=2),
        rec("start", 29.2, 31, gpus=4, pid=3),
        rec("restored", 31, 32, step=19, pid=3),
        rec("train", 32, 42, step0=20, step1=29, steps=10, snapshots=1, nbytes=10**9, pid=3),
        rec("close", 42, 43, pid=3),
        rec("exit", 43.5, 43.55, attempt=2, code=0),
        rec("run_end", 44, code=0, note="completed"),
    ]
    a = account(records)
    expected = {"productive": 29.5, "stall": 1.6, "lost": 4.8, "restart": 4.1, "startup": 4.0, "hang": 0, "paused": 0}
    assert a.seconds == pytest.approx(expected, abs=1e-5) and a.wall_s == pytest.approx(44.0)
    (f,) = a.failures
    assert f.cause == "killed by SIGKILL" and f.lost_s == pytest.approx(4.8, abs=1e-5)
    assert f.restart_s == pytest.approx(4.1, abs=1e-5) and f.steps_lost == pytest.approx(4.8 / a.step_time_s)
    assert a.step_time_s == pytest.approx(59 / 60)  # the median span: 0.95, 0.967, 1.0, 1.0 s a step
    assert a.gpu_hours("lost") == pytest.approx(4.8 * 4 / 3600) and a.dollars("lost") == pytest.approx(4.8 * 4 / 1800)
    assert a.energy_estimated_j == pytest.approx(44.0 * 4 * 700) and not a.energy_measured_j
    assert a.storage_usd > 0 and a.snapshots == 3 and a.stall_per_snapshot_s == pytest.approx(0.2)


def test_a_hang_outranks_the_span_it_stopped_and_a_stop_ends_in_restart():
    records = [
        rec("start", 0, 1, gpus=1),
        rec("train", 1, 11, step0=0, step1=9, steps=10, snapshots=1),
        rec("train", 11, 15, step0=10, step1=13, steps=4),
        Record(kind="hang", pid=2, t0=T + 14.5, t1=T + 30),  # its last heartbeat was within the span
        Record(kind="stop", pid=2, t0=T + 30, t1=T + 33, note="no progress for 15 s (limit 15 s)"),
        rec("start", 34, 36, gpus=1, pid=3),
        rec("restored", 36, 37, step=9, pid=3),
        rec("train", 37, 41, step0=10, step1=13, steps=4, pid=3),
        rec("close", 41, 41.5, pid=3),
        Record(kind="energy", pid=0, t0=T + 10, t1=T + 20, joules=3000.0, gpus=1),
    ]
    a = account(records)
    assert a.seconds["hang"] == pytest.approx(15.5)
    assert a.seconds["lost"] == pytest.approx(3.5)  # steps 10-13 until the hang began, redone after the restore
    assert a.seconds["restart"] == pytest.approx(3 + 1 + 3)  # the stop, the gap to the next process, its start
    assert a.failures[0].cause.startswith("no progress") and a.failures[0].hang_s == pytest.approx(15.5)
    assert a.energy_measured_j == pytest.approx(3000.0)
    # 14.5..20 s inside the record (300 W), 20..30 s estimated at 700 W for the one GPU
    assert a.energy_j["hang"] == pytest.approx(300.0 * 5.5 + 700.0 * 10)


def test_energy_meter_turns_counters_into_joules_and_power_limits_into_estimates():
    m = EnergyMeter(every=10.0)
    m.read(T, [GpuEnergy(0, 1_000_000, 700.0), GpuEnergy(1, None, 400.0)])
    joules = m.read(T + 2, [GpuEnergy(0, 1_600_000, 700.0), GpuEnergy(1, None, 400.0)])
    assert joules == {0: (600.0, False), 1: (800.0, True)}
    assert m.add("job", T + 2, joules, [0, 1]) == []
    out = m.add("job", T + 12, {0: (100.0, False)}, [0, 1])
    assert [(r.joules, r.estimate, r.gpus) for r in out] == [(700.0, False, 2), (800.0, True, 2)]


def test_nvml_energy_reads_the_counter_or_the_power_limit_where_it_is_not_supported(tmp_path, monkeypatch):
    from ckptd.daemon.nvml import NvmlHealthSource

    timeline = tmp_path / "timeline.json"
    timeline.write_text(json.dumps({"gpus": 1, "power_w": 200, "not_supported": []}))
    monkeypatch.setenv("PYTHONPATH", TESTS)
    monkeypatch.syspath_prepend(TESTS)
    monkeypatch.setenv("FAKE_NVML_TIMELINE", str(timeline))
    nvml = NvmlHealthSource("fake_nvml")
    t0 = time.monotonic()
    (a,) = nvml.energy()
    t1 = time.monotonic()
    time.sleep(0.5)
    t2 = time.monotonic()
    (b,) = nvml.energy()
    t3 = time.monotonic()
    assert a.limit_w == 700.0 and a.millijoules is not None and b.millijoules is not None
    assert 200 * (t2 - t1) - 1 <= (b.millijoules - a.millijoules) / 1000 <= 200 * (t3 - t0) + 1  # 200 W
    nvml.close()
    timeline.write_text(json.dumps({"gpus": 1, "not_supported": ["nvmlDeviceGetTotalEnergyConsumption"]}))
    older = NvmlHealthSource("fake_nvml")
    assert [(g.millijoules, g.limit_w) for g in older.energy()] == [(None, 700.0)]
    older.close()


def test_the_daemons_watch_meters_every_rank_gpus_and_records_hangs_and_stops(tmp_path):
    from types import SimpleNamespace

    from ckptd.ledger.watch import LedgerWatch

    store = str(tmp_path / "s")
    ranks = [SimpleNamespace(store=store, job="j", pid=100 + i, devices=(i,)) for i in range(2)]
    relative = SimpleNamespace(store="runs/s", job="k", pid=7, devices=())  # the daemon cannot know its directory
    watch = LedgerWatch(every=5.0)
    t = time.time() - 100  # close() ends the open window now
    for i in range(3):  # three GPUs at 100, 200 and 300 W; the job's ranks use GPUs 0 and 1
        readings = [GpuEnergy(g, int(i * 2 * 100 * (g + 1) * 1000), 700.0) for g in range(3)]
        watch.tick(t + 2 * i, readings, [*ranks, relative], bad=set())
    watch.hang(ranks[1], 30.0, t + 40)
    watch.stopping(ranks[1], "no progress for 30 s (limit 20 s)", t + 40)
    watch.gone(ranks[1], t + 43)
    watch.close()
    records = LedgerReader(FileStore(store)).read().records()
    energy = [r for r in records if r.kind == "energy"]
    assert sum(r.joules for r in energy) == pytest.approx(4 * (100 + 200)) and {r.gpus for r in energy} == {2}
    assert not any(r.estimate for r in energy)
    (hang,) = [r for r in records if r.kind == "hang"]
    (stop,) = [r for r in records if r.kind == "stop"]
    assert (hang.t0, hang.t1, stop.t0, stop.t1) == (t + 10, t + 40, t + 40, t + 43) and stop.note.startswith("no prog")
    assert not os.path.exists("runs")


def test_the_policy_uses_the_ledger_until_this_process_has_measured():
    def ctx(stall):
        return PolicyContext(
            step=100, now=0.0, steps_since=1, seconds_since=1.0, step_time=0.1, stall=stall, persist=1.0, in_flight=0
        )

    p = RiskAwarePolicy()
    blind = p.decide(ctx(None))
    p.use_measured(stall=2.0, restart=15.0, lost=4.0, source="ledger of s3://b/run")
    told = p.decide(ctx(None))
    assert told["stall_from"] == "ledger of s3://b/run" and told["stall_s"] == 2.0
    assert told["interval"] > 10 * blind["interval"]  # not the 0 s a restarted process assumed
    assert told["restart_s"] == 15.0 and told["lost_s"] == 4.0
    own = p.decide(ctx(0.1))
    assert own["stall_from"] == "this process" and own["stall_s"] == 0.1
    with pytest.raises(ValueError):
        p.use_measured(stall=float("nan"))


# -- a real job -------------------------------------------------------------------


class Session:
    """`ckptd run` in a subprocess; its stderr read as it comes (the trainer's lines included)."""

    def __init__(self, args: list[str], env: dict) -> None:
        self.lines: list[str] = []
        self.summary_at: float | None = None
        """When its summary table came: the job is over, and `ckptd run` only exits after it."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckptd.cli", "run", *args], env=env, stderr=subprocess.PIPE, text=True
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if self.summary_at is None and "ckptd run: " in line and " restarts" in line:
                self.summary_at = time.time()
            self.lines.append(line.rstrip("\n"))

    @property
    def launches(self) -> int:
        return sum(line.startswith("starting at step") for line in self.lines)

    def wait_for(self, what: str, cond, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert self.proc.poll() is None, f"ckptd run ended while waiting for {what}:\n" + self.tail()
            assert time.monotonic() < deadline, f"timed out waiting for {what}:\n" + self.tail()
            time.sleep(0.02)

    def kill_trainer(self) -> None:
        trainers = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if TRAIN in " ".join(p.cmdline()):
                    trainers.append(p)
            except psutil.Error:
                continue
        assert len(trainers) == 1, trainers
        trainers[0].send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 180.0) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(10)
        return code

    def tail(self) -> str:
        return "\n".join(self.lines[-40:])


def steps_logged(path: str) -> list[int]:
    try:
        with open(path) as f:
            return [int(line.split()[0]) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def goodput(uri: str, *args: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "ckptd.cli", "goodput", uri, "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    }


def disagreements(f: dict, m: dict[str, float], job: str) -> list[str]:
    """Where the Prometheus figures differ from `ckptd goodput --json`'s."""
    want = {f'ckptd_goodput_ratio{{job="{job}"}}': f["goodput_ratio"]}
    want[f'ckptd_productive_seconds_total{{job="{job}"}}'] = f["seconds"]["productive"]
    for cause, seconds in f["badput_s"].items():
        want[f'ckptd_badput_seconds_total{{cause="{cause}",job="{job}"}}'] = seconds
    for cause, joules in f["energy_j"].items():
        want[f'ckptd_energy_joules_total{{cause="{cause}",job="{job}"}}'] = joules
    return [f"{k}: {m.get(k)} != {v}" for k, v in want.items() if m.get(k) != pytest.approx(v, rel=1e-9, abs=1e-9)]


def dump(uri: str, start: float) -> str:
    """The ledger's records, one a line, times from the start (for a failing assertion's message)."""
    from ckptd.store import open_store

    lines = []
    for r in LedgerReader(open_store(uri)).read().records():
        if r.kind != "energy":
            d = r.to_dict()
            lines.append(f"{r.t0 - start:8.3f} {r.t1 - start:8.3f} {d}")
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_job_killed_faulted_and_preempted_is_accounted_to_the_second(s3env, tmp_path):
    """Two `ckptd run` sessions of one job on S3: a SIGKILL, a fatal XID from the fake NVML and a SIGTERM in the
    first; a fresh local tier, a SIGKILL and the finish in the second, beside a daemon serving metrics."""
    uri = f"s3://{s3env.make_bucket()}/run"
    work = tempfile.mkdtemp(prefix="ckg-", dir="/tmp")  # short socket paths
    fault = os.path.join(work, "fault")
    timeline = os.path.join(work, "timeline.json")
    with open(timeline, "w") as f:
        json.dump({"gpus": 2, "power_w": 250, "events": [{"when_exists": fault, "gpu": 1, "xid": 79}]}, f)
    env = {
        **os.environ,
        **s3env.env(),
        "CKPTD_NVML_MODULE": "fake_nvml",
        "FAKE_NVML_TIMELINE": timeline,
        "PYTHONPATH": os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]),
        "CKPTD_LEDGER_EVERY": "1",
        "CKPTD_JOB": "goodput-job",
    }
    losses = str(tmp_path / "loss.log")
    trainer = [TRAIN, "--steps", "200", "--policy", "every:30", "--step-sleep", "0.05", "--width", "64"]
    trainer = [sys.executable, *trainer, "--loss-log", losses, "--verbose"]
    run_args = ["--store", uri, "--backoff", "0.2", "--grace", "30"]

    def top() -> int:
        return max(steps_logged(losses), default=-1)

    t_start = time.time()
    s1 = Session([*run_args, "--gpus", "0,1", "--socket", f"{work}/d1.sock", "--", *trainer],
                 {**env, "CKPTD_LOCAL": str(tmp_path / "tier1")})  # fmt: skip
    s1.wait_for("step 55 of the first launch", lambda: s1.launches == 1 and top() >= 55)  # 29 is the snapshot
    s1.kill_trainer()
    s1.wait_for("step 90 of the second launch", lambda: s1.launches == 2 and top() >= 90)
    open(fault, "w").close()  # the fake NVML raises XID 79 on GPU 1: the daemon stops the job
    s1.wait_for("step 130 of the third launch", lambda: s1.launches == 3 and top() >= 130)
    s1.proc.send_signal(signal.SIGTERM)  # preempted: an emergency snapshot, exit 75
    assert s1.wait() == 75, s1.tail()
    t_between = time.time()

    port = free_port()
    daemon_env = {**env, "FAKE_NVML_TIMELINE": os.path.join(work, "calm.json")}
    with open(daemon_env["FAKE_NVML_TIMELINE"], "w") as f:
        json.dump({"gpus": 2, "power_w": 250, "events": []}, f)
    sock2 = f"{work}/d2.sock"
    daemon = subprocess.Popen(
        [sys.executable, "-m", "ckptd.cli", "daemon", "--socket", sock2, "--store", uri, "--poll", "0.2"]
        + ["--metrics-port", str(port), "--log", f"{work}/d2.log"],
        env=daemon_env,
    )
    try:
        while not os.path.exists(sock2):
            assert daemon.poll() is None
            time.sleep(0.05)
        t_resume = time.time()
        s2 = Session([*run_args, "--socket", sock2, "--", *trainer], {**env, "CKPTD_LOCAL": str(tmp_path / "tier2")})
        s2.wait_for("step 175 after the move", lambda: s2.launches == 1 and top() >= 175)  # after 149's snapshot
        s2.kill_trainer()
        assert s2.wait() == 0, s2.tail()
        assert s2.summary_at is not None, s2.tail()
        t_end = s2.summary_at  # what follows is the interpreter's exit, no job's time

        f = goodput(uri, env=env)
        # The empty local tier's launch read the first session's ledger back from S3.
        assert f"goodput ledger of {uri}: stall" in "\n".join(s2.lines) and "(2 failures)" in "\n".join(s2.lines)

        # Every second once: the causes add up to the wall time measured out here.
        wall = t_end - t_start
        assert sum(f["seconds"].values()) == pytest.approx(f["wall_s"], rel=1e-9)
        assert f["wall_s"] == pytest.approx(wall, rel=0.01), (f["wall_s"], wall)
        assert f["seconds"]["paused"] == pytest.approx(t_resume - t_between, abs=0.5 + 0.01 * wall)

        # Lost work: the steps the loss log shows twice, at the measured step time.
        redone = sum(n - 1 for n in Counter(steps_logged(losses)).values())
        step_time, lost = f["step_time_s"], f["seconds"]["lost"]
        print(
            f"wall {wall:.2f} s (ledger {f['wall_s']:.2f}); lost {lost:.3f} s = {redone} steps redone x {step_time:.4f} s"
        )
        assert redone >= 40, redone
        # Within a partial step and a poll per kill, and the steps right after a snapshot being slower than
        # the median (the upload competes for the two cores); counting a restart (seconds) as lost would not be.
        assert abs(lost - redone * step_time) <= 2 * (step_time + 0.25) + 0.25 * redone * step_time, (
            f"lost {lost} s, {redone} steps redone at {step_time} s\n{dump(uri, f['start'])}"
        )
        causes = [x["cause"] for x in f["failures"]]
        assert len(causes) == 3, causes
        assert causes[0].startswith("killed by SIGKILL") and causes[2].startswith("killed by SIGKILL"), causes
        assert causes[1].startswith("fatal fault on GPU 1: XID 79"), causes
        assert f["failures"][1]["lost_s"] < 2 * step_time + 0.2  # the emergency snapshot kept the work
        assert sum(x["lost_s"] for x in f["failures"]) == pytest.approx(lost, abs=1e-6)
        assert f["launches"] == 5
        assert f["seconds"]["productive"] == pytest.approx(200 * step_time, rel=0.15)  # each of the 200 steps once

        # Energy: measured by the daemons' NVML counters at 250 W a GPU (2, then 1 after the fault, then 2).
        assert "measured: NVML total energy counters" in f["energy_how"]
        covered = f["held_s"] - f["energy_estimated_j"] / (700.0 * f["gpus"])
        assert 250 * 0.95 <= f["energy_measured_j"] / covered <= 500 * 1.05, (f["energy_measured_j"], covered)

        # Prometheus, `ckptd status` and `ckptd goodput --json` give the same figures.
        deadline = time.monotonic() + 60
        while True:
            f_job = goodput(uri, "--job", "goodput-job", env=env)
            time.sleep(2.5)  # the daemon refreshes every second
            diff = disagreements(f_job, scrape(port), "goodput-job")
            if not diff:
                break
            assert time.monotonic() < deadline, diff
        assert f_job["seconds"] == f["seconds"]
        status = subprocess.run(
            [sys.executable, "-m", "ckptd.cli", "status", "--json", "--socket", sock2],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        shown = json.loads(status.stdout)["goodput"]["goodput-job"]
        assert shown["seconds"] == f_job["seconds"] and shown["energy_j"] == f_job["energy_j"]

        png = tmp_path / "goodput.png"
        out = subprocess.run(
            [sys.executable, "-m", "ckptd.cli", "goodput", uri, "--plot", str(png)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0 and "productive" in out.stdout and "fatal fault on GPU 1" in out.stdout
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
