"""A one-node Slurm for the tests: munged, slurmctld and slurmd in the foreground, as children of the test.

Everything lives under one directory (key, sockets, state, spool, logs) and
every Slurm command runs with ``SLURM_CONF`` pointing at its slurm.conf, so
nothing touches the machine's own /etc/slurm or a cluster it may belong to.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")
CRED_EXPIRE = 10
"""Seconds of a job credential's life; a requeued job waits this long (+1) before it may start again."""


def _which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin:/usr/local/sbin")


def why_not() -> str | None:
    """Why a test Slurm cannot start here, in words; None when it can."""
    missing = [p for p in PROGRAMS if _which(p) is None]
    if missing:
        return (
            f"Slurm is not installed ({', '.join(missing)} not found); scripts/install.sh installs it with "
            "`apt-get install -y slurm-wlm munge`"
        )
    if os.geteuid() != 0:
        return "a test Slurm needs root (slurmd starts each job as its owner); run the tests as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd on this host, one node named after it. One owner; ``stop()`` ends all three."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="sl-", dir="/tmp")  # short: the munge socket path has a length limit
        self.node = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.munge_socket = os.path.join(self.dir, "munge", "munge.socket.2")
        self._procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle ------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SlurmCluster:
        try:
            self._start_munge(timeout)
            self._write_conf()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
            self._wait(lambda: self.run("scontrol", "ping").stdout.count("UP") > 0, timeout, "slurmctld to answer")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", self.conf])
            self._wait(lambda: self.node_state().startswith("idle"), timeout, f"node {self.node} to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self, timeout: float) -> None:
        mdir = os.path.dirname(self.munge_socket)
        os.makedirs(mdir, mode=0o700)
        key = os.path.join(mdir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self._spawn(
            "munged",
            [
                _which("munged"),
                "-F",
                "-f",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={mdir}/munged.pid",
                f"--log-file={mdir}/munged.log",
                f"--seed-file={mdir}/munged.seed",
            ],
        )
        self._wait(lambda: os.path.exists(self.munge_socket), timeout, "munged's socket")

    def _write_conf(self) -> None:
        d = self.dir
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        lines = [
            "ClusterName=ckptdtest",
            f"SlurmctldHost={self.node}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}",
            "CredType=cred/munge",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdLogFile={d}/slurmd.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobRequeue=1",
            "ReturnToService=2",
            "MpiDefault=none",
            "KillWait=30",
            "SchedulerType=sched/builtin",
            "SchedulerParameters=sched_interval=2",  # a requeued job is looked at 2 s after its BeginTime, not 60 "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "MinJobAge=600",
            f"NodeName={self.node} CPUs=2 RealMemory=20000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _spawn(self, name: str, cmd: list) -> None:
        out = open(os.path.join(self.dir, f"{name}.out"), "w")
        self._procs[name] = subprocess.Popen(
            cmd, env=self.env(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
        out.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{self.logs()}")
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}:\n{self.logs()}")
            time.sleep(0.2)

    def stop(self, *, remove: bool = False) -> None:
        """End the jobs, then slurmd, slurmctld and munged (SIGTERM, SIGKILL after 30 s); ``remove`` the directory."""
        if self._procs.get("slurmctld") is not None and self._procs["slurmctld"].poll() is None:
            self._end_jobs()  # a job's slurmstepd outlives slurmd by design
        for name in ("slurmd", "slurmctld", "munged"):
            p = self._procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _end_jobs(self, timeout: float = 60.0) -> None:
        try:
            self.run("scancel", "--full", "--state=RUNNING")
            self.run("scancel", "--state=PENDING")
            deadline = time.monotonic() + timeout
            while self.run("squeue", "-h", "-o", "%i").stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.5)
        except (OSError, subprocess.SubprocessError):
            pass

    # -- using it -------------------------------------------------------------

    def env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.conf, **extra}

    def run(
        self, *cmd: str, check: bool = False, env: dict | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        res = subprocess.run(list(cmd), capture_output=True, text=True, env=env or self.env(), timeout=timeout)
        if check and res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def sbatch(self, *args: str, env: dict | None = None) -> str:
        """Submit; the job id."""
        return self.run("sbatch", "--parsable", *args, check=True, env=env).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as key=value pairs (values without spaces)."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=True).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: str, ready, timeout: float, what: str) -> dict[str, str]:
        """Poll the job until ``ready(fields)``; its fields then. RuntimeError with the logs on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.job(job_id)
            if ready(fields):
                return fields
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id}: timed out waiting for {what}; now {fields}\n{self.logs()}")
            time.sleep(0.25)

    def node_state(self) -> str:
        return self.run("sinfo", "-h", "-n", self.node, "-o", "%T").stdout.strip()

    def logs(self, lines: int = 30) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f"--- {name}\n" + "".join(f.readlines()[-lines:]))
        return "\n".join(out)
