"""CRIU: found, checked, and run for one dump or one restore, with one-line errors (no torch).

CRIU is ``$CKPTD_CRIU`` or ``criu`` on PATH, version 4 or newer (Debian bookworm's 3.17 fails on the
kernels here: "Unexpected rt vDSO area bounds"), and ``criu check`` must pass. Each refusal names what
is missing and, where no fix on this machine helps, the hook as the way for such jobs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import CriuFailed, TransparentRefused

log = logging.getLogger("ckptd")

ENV = "CKPTD_CRIU"
MIN_VERSION = (4, 0)
HOOK = "use the hook (ckptd.Checkpointer) in the training script"
STATS = "stats-dump"
"""The dump's own statistics file, which CRIU writes into its work directory; moved among the images."""
_HARMLESS = ("Can't setup RLIMIT_NOFILE", "Can't check shutdown state of inet socket")
"""CRIU errors that are not fatal (logged without CAP_SYS_RESOURCE, and the restore goes on)."""
_CAPS = {"CAP_SYS_ADMIN": 21, "CAP_SYS_PTRACE": 19, "CAP_CHECKPOINT_RESTORE": 40}
_TIMEOUT = 1800.0


@dataclass(frozen=True)
class DumpStats:
    """What CRIU measured in one dump (its ``stats-dump``), in seconds."""

    frozen_s: float
    """How long the job's processes were stopped: the freeze a dump costs the job."""
    freezing_s: float
    memdump_s: float
    memwrite_s: float
    pages_written: int


def parse_stats(data: bytes) -> DumpStats:
    """DumpStats from the bytes of ``stats-dump``: two magics, a length, then a protobuf StatsEntry."""
    try:
        size = int.from_bytes(data[8:12], "little")
        top = _protobuf(data[12 : 12 + size])
        dump = _protobuf(top[1])
        return DumpStats(
            frozen_s=dump[2] / 1e6,
            freezing_s=dump[1] / 1e6,
            memdump_s=dump[3] / 1e6,
            memwrite_s=dump[4] / 1e6,
            pages_written=int(dump.get(7, 0)),
        )
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise ValueError(f"not a CRIU dump statistics file: {e}") from e


def _protobuf(body: bytes) -> dict:
    """Field number → value of one protobuf message: varints and length-delimited fields (all stats use)."""
    out: dict = {}
    i = 0
    while i < len(body):
        key, i = _varint(body, i)
        kind = key & 7
        if kind == 0:
            out[key >> 3], i = _varint(body, i)
        elif kind == 2:
            n, i = _varint(body, i)
            out[key >> 3], i = body[i : i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {kind}")
    return out


def _varint(b: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        c = b[i]
        i += 1
        value |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return value, i


def parse_version(text: str) -> tuple[int, ...]:
    """(4, 2) from ``criu --version``'s "Version: 4.2"; () if there is no version in it."""
    m = re.search(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?", text)
    return tuple(int(g) for g in m.groups() if g is not None) if m else ()


def missing_privileges(status: str, cap_last: int) -> list[str]:
    """The capabilities a dump needs and this process lacks (from /proc/self/status); [] when it has them."""
    m = re.search(r"^CapEff:\s*([0-9a-f]+)", status, re.M)
    eff = int(m.group(1), 16) if m else 0
    needed = {name: bit for name, bit in _CAPS.items() if bit <= cap_last}
    missing = [name for name, bit in needed.items() if not eff >> bit & 1]
    return missing


@dataclass(frozen=True)
class Criu:
    """One CRIU binary that passed ``criu check``. Thread-safe (each call is its own process)."""

    path: str
    version: tuple[int, ...]
    libdir: str | None = None
    """Where its plugins are (``cuda_plugin.so``): ``<prefix>/lib/criu`` beside ``<prefix>/bin/criu``."""
    unprivileged: bool = False
    """Not root: CRIU runs with ``--unprivileged`` on the capabilities it was given."""
    network_lock: str | None = None
    """How CRIU holds TCP connections still while it dumps them (``--network-lock``): nftables where it was
    built with it, else iptables when installed, else None (connections inside a job cannot be dumped)."""

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @classmethod
    def find(cls, environ: Mapping[str, str] = os.environ) -> Criu:
        """The CRIU this machine offers, checked: version, privileges, ``criu check``; else TransparentRefused."""
        path = environ.get(ENV) or shutil.which("criu", path=environ.get("PATH"))
        where = f"{ENV}={environ[ENV]}" if environ.get(ENV) else "criu on PATH"
        if not path or not os.access(path, os.X_OK):
            raise TransparentRefused(
                f"transparent mode needs CRIU >= 4 and found none ({where}: "
                f"{'not an executable' if path else 'none'}): install it (bash scripts/install.sh builds 4.2) "
                f"and set {ENV}, or {HOOK}"
            )
        out = _run([path, "--version"], what="criu --version")
        version = parse_version(out.stdout)
        if version < MIN_VERSION:
            raise TransparentRefused(
                f"{path} is CRIU {'.'.join(map(str, version)) or '(no version)'}; transparent mode needs >= 4 "
                f"(older ones fail on these kernels): install 4.2 (bash scripts/install.sh) and set {ENV}, or {HOOK}"
            )
        with open("/proc/self/status") as f:
            status = f.read()
        missing = missing_privileges(status, _cap_last())
        if missing:
            raise TransparentRefused(
                f"transparent mode needs root or {', '.join(missing)} for CRIU and a PID namespace: "
                f"run ckptd run as root, or {HOOK}"
            )
        plugins = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(path))), "lib", "criu")
        criu = cls(path, version, plugins if os.path.isdir(plugins) else None, os.geteuid() != 0)
        criu.check()
        lock = "nftables" if criu.feature("network_lock_nftables") else "iptables" if shutil.which("iptables") else None
        return dataclasses.replace(criu, network_lock=lock)

    def _base(self) -> list[str]:
        return [self.path] + (["--unprivileged"] if self.unprivileged else [])

    def check(self) -> None:
        """``criu check``: TransparentRefused with CRIU's own reason when it says this kernel will not do."""
        out = _run(self._base() + ["check"], what="criu check")
        if out.returncode != 0:
            text = (out.stdout + out.stderr).strip().splitlines()
            reason = next((ln for ln in text if "Error" in ln), text[-1] if text else f"exit {out.returncode}")
            raise TransparentRefused(f"`{self.path} check` fails here ({reason.strip()}); {HOOK}")

    def feature(self, name: str) -> bool:
        """``criu check --feature NAME`` (e.g. mem_dirty_track, which incremental pre-dumps need)."""
        return _run(self._base() + ["check", "--feature", name], what="criu check --feature").returncode == 0

    def dump(
        self,
        pid: int,
        images: str,
        *,
        work: str,
        tcp_established: bool = False,
        plugins: bool = False,
    ) -> DumpStats:
        """Dump the tree rooted at ``pid`` into ``images``, leaving it running; CriuFailed naming the error."""
        args = ["dump", "-t", str(pid), "-D", images, "-W", work, "-o", "dump.log", "--leave-running"]
        args += self._tcp_args(tcp_established)
        args += self._plugin_args(plugins)
        self._call(args, what=f"criu dump of pid {pid}", log_file=os.path.join(work, "dump.log"))
        try:
            os.replace(os.path.join(work, STATS), os.path.join(images, STATS))
            with open(os.path.join(images, STATS), "rb") as f:
                return parse_stats(f.read())
        except (OSError, ValueError) as e:
            raise CriuFailed(f"criu dump of pid {pid} left no readable {STATS} in {work}: {e}") from e

    def restore(
        self,
        images: str,
        *,
        work: str,
        inherit: Mapping[str, int],
        tcp_established: bool = False,
        plugins: bool = False,
    ) -> int:
        """Restore the tree in ``images`` detached; returns its root's pid. ``inherit``: CRIU's name of a
        file of the image (``pipe:[INODE]``) → an fd of this process that takes its place."""
        pidfile = os.path.join(work, f"restored-{time.monotonic_ns()}.pid")
        args = ["restore", "-D", images, "-W", work, "-o", "restore.log", "-d", "--pidfile", pidfile]
        for name, fd in inherit.items():
            args += ["--inherit-fd", f"fd[{fd}]:{name}"]
        args += self._tcp_args(tcp_established)
        args += self._plugin_args(plugins)
        self._call(
            args,
            what=f"criu restore of {images}",
            log_file=os.path.join(work, "restore.log"),
            pass_fds=tuple(inherit.values()),
        )
        try:
            with open(pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError) as e:
            raise CriuFailed(f"criu restore of {images} wrote no pid file: {e}") from e
        finally:
            _unlink(pidfile)

    def _tcp_args(self, tcp_established: bool) -> list[str]:
        if not tcp_established:
            return []
        return ["--tcp-established"] + (["--network-lock", self.network_lock] if self.network_lock else [])

    def _plugin_args(self, plugins: bool) -> list[str]:
        return ["--libdir", self.libdir] if plugins and self.libdir else []

    def _call(
        self,
        args: list[str],
        *,
        what: str,
        log_file: str,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        proc = subprocess.Popen(
            self._base() + args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
        )
        try:
            _, err = proc.communicate(timeout=_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise CriuFailed(f"{what} took over {_TIMEOUT:.0f} s and was stopped; see {log_file}") from None
        if proc.returncode != 0:
            reason = first_error(log_file) or err.decode(errors="replace").strip()[-300:] or f"exit {proc.returncode}"
            raise CriuFailed(f"{what} failed: {reason} (log: {log_file})")


def first_error(log_file: str, most: int = 3) -> str:
    """The first fatal errors of a CRIU log on one line, without timestamps and sources; '' when none."""
    found: list[str] = []
    try:
        with open(log_file, errors="replace") as f:
            for line in f:
                if "Error (" not in line or any(h in line for h in _HARMLESS) or "FAILED" in line:
                    continue
                text = re.sub(r"^(\(\s*[\d.]+\)\s*)?Error \([^)]*\):\s*", "", line.strip())
                if text not in found:
                    found.append(text)
                if len(found) == most:
                    break
    except OSError:
        pass
    return "; ".join(found)


def _run(cmd: list[str], *, what: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TransparentRefused(f"{what} could not run ({e}); {HOOK}") from e


def _cap_last() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
