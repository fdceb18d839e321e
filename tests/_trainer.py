"""Run examples/train.py (or a test file that is also a job) as a real subprocess and kill it with a real signal."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train.py")


@dataclass
class Run:
    returncode: int
    lines: list[str] = field(default_factory=list)
    killed_after: str | None = None


def run_trainer(
    store: str,
    *args: str,
    kill_on: str | None = None,
    kill_delay: float = 0.0,
    sig: int = signal.SIGKILL,
    timeout: float = 180.0,
    env: dict | None = None,
    on_match=None,
) -> Run:
    """Run the trainer; send ``sig`` ``kill_delay`` s after a stderr line matches ``kill_on``
    (or call ``on_match()`` instead, to break something else at that moment)."""
    cmd = [sys.executable, TRAIN, "--store", store, "--verbose", *args]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    run = Run(returncode=0)
    timed_out = threading.Event()
    timer = threading.Timer(timeout, lambda: (timed_out.set(), proc.kill()))
    timer.start()
    pattern = re.compile(kill_on) if kill_on else None
    try:
        for line in proc.stderr:
            run.lines.append(line.rstrip("\n"))
            if pattern is not None and run.killed_after is None and pattern.search(line):
                if kill_delay:
                    time.sleep(kill_delay)
                if on_match is not None:
                    on_match()
                else:
                    proc.send_signal(sig)
                run.killed_after = line.strip()
        run.returncode = proc.wait()
    finally:
        timer.cancel()
    if timed_out.is_set():
        raise AssertionError("trainer hit the timeout:\n" + "\n".join(run.lines[-20:]))
    return run


def read_losses(path: str) -> dict[int, set[str]]:
    """Each step's logged losses; a step redone after a resume appears more than once."""
    out: dict[int, set[str]] = {}
    with open(path) as f:
        for line in f:
            step, value = line.split()
            out.setdefault(int(step), set()).add(value)
    return out


def assert_same_state(a_path: str, b_path: str) -> None:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert_tree_equal(a, b)


def run_script(
    script: str, *args: str, kill_on: str | None = None, timeout: float = 120.0, env: dict | None = None
) -> tuple[int, list[str]]:
    """``python script *args`` as a real subprocess, ckptd importable; SIGKILL as soon as a stderr line
    matches ``kill_on``. Its exit code and stderr lines."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, script, *args], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines, pattern = [], re.compile(kill_on) if kill_on else None
    try:
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if pattern is not None and pattern.search(line):
                proc.send_signal(signal.SIGKILL)
                pattern = None
        return proc.wait(), lines
    finally:
        timer.cancel()


def assert_tree_equal(a, b, where: str = "", *, same_sequence_type: bool = True) -> None:
    """Bitwise equal nests of tensors and plain values; ``same_sequence_type=False`` lets a tuple equal a list
    (a framework's own checkpoint may turn one into the other)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{where}.{k}", same_sequence_type=same_sequence_type)
    elif isinstance(a, (list, tuple)):
        assert (type(a) is type(b) or not same_sequence_type) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{where}[{i}]", same_sequence_type=same_sequence_type)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"
