"""What a CUDA job's dump needs, each missing piece said in one line (no torch, no NVML).

CRIU's CUDA plugin (``cuda_plugin.so``, built beside CRIU) drives NVIDIA's ``cuda-checkpoint``: it locks
the job's CUDA work, moves device memory into the process image and back on restore. The plugin turns
itself off silently when ``cuda-checkpoint`` is not on PATH or lacks ``--action`` (drivers before r555),
and the dump then fails on the job's open ``/dev/nvidia*`` files; ckptd says which piece is missing first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import TransparentRefused
from .criu import HOOK

MIN_DRIVER = (555,)
"""cuda-checkpoint's lock/checkpoint/restore/unlock actions, which CRIU's plugin uses, came with r555."""
DRIVER_FILE = "/proc/driver/nvidia/version"
PLUGIN = "cuda_plugin.so"


@dataclass(frozen=True)
class GpuTools:
    """Everything a CUDA job's dump and restore use, found and checked."""

    cuda_checkpoint: str
    driver: str
    """The NVIDIA kernel module's version, e.g. 570.86.15 (recorded in the image's manifest)."""
    plugin_dir: str


def driver_version(text: str) -> str:
    """'570.86.15' from /proc/driver/nvidia/version's first line; '' when there is none."""
    m = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else ""


def gpu_tools(
    libdir: str | None,
    *,
    environ: Mapping[str, str] = os.environ,
    driver_file: str = DRIVER_FILE,
) -> GpuTools:
    """The tools a CUDA job needs, or TransparentRefused naming the first one missing."""
    try:
        with open(driver_file) as f:
            driver = driver_version(f.read())
    except OSError:
        driver = ""
    if not driver:
        raise TransparentRefused(
            f"this job uses an NVIDIA GPU but {driver_file} names no driver: load the NVIDIA driver "
            f"(r{MIN_DRIVER[0]} or newer), or {HOOK}"
        )
    if tuple(int(p) for p in driver.split(".")[:1]) < MIN_DRIVER:
        raise TransparentRefused(
            f"NVIDIA driver {driver} is too old for cuda-checkpoint's CRIU plugin (needs r{MIN_DRIVER[0]} or "
            f"newer): upgrade the driver, or {HOOK}"
        )
    tool = shutil.which("cuda-checkpoint", path=environ.get("PATH"))
    if tool is None:
        raise TransparentRefused(
            "this job uses an NVIDIA GPU and cuda-checkpoint is not on PATH: install it from "
            f"https://github.com/NVIDIA/cuda-checkpoint, or {HOOK}"
        )
    try:
        usage = subprocess.run([tool, "--help"], capture_output=True, text=True, timeout=30)
        text = usage.stdout + usage.stderr
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TransparentRefused(f"{tool} --help does not run ({e}): reinstall cuda-checkpoint, or {HOOK}") from e
    if "--action" not in text:
        raise TransparentRefused(
            f"{tool} has no --action (a driver or cuda-checkpoint before r{MIN_DRIVER[0]}): update both, or {HOOK}"
        )
    if libdir is None or not os.path.isfile(os.path.join(libdir, PLUGIN)):
        raise TransparentRefused(
            f"CRIU's CUDA plugin ({PLUGIN}) is not in {libdir or 'lib/criu beside the criu binary'}: "
            f"rebuild CRIU with bash scripts/install.sh, or {HOOK}"
        )
    return GpuTools(tool, driver, libdir)
