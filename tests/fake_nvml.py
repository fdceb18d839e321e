"""A stand-in for pynvml with its names, constants and error classes, fed by a scripted timeline.

$FAKE_NVML_TIMELINE names a JSON file: {"gpus": N, "missing": bool, "not_supported": [function names],
"driver": str, "cuda": int, "events": [{"t": seconds after nvmlInit, "gpu": i, "xid": n} or
{"t", "gpu", "set": {counter: value}}]}; an event with "when_exists": PATH instead of "t" happens once
PATH exists (a test's cue, so a fault lands while the job runs however slowly it started).
Counters: ecc_uncorrected, ecc_corrected, remap_pending, remap_failed, retired_pending,
clock_reasons, temperature, pcie_replays, lost, processes (pids computing on the GPU), power_w (the
power drawn: the total-energy counter, in mJ as pynvml gives it, grows by it), power_limit_w.
"power_w" at the top level sets every GPU's starting power (default 300).
A function named in "not_supported" raises NVMLError_NotSupported, as older drivers do.
Identity follows pynvml: name and UUID as str, PCI info a struct whose busId is bytes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass


class NVMLError(Exception):
    value = 999

    def __str__(self) -> str:
        return type(self).__name__.removeprefix("NVMLError_")


class NVMLError_Uninitialized(NVMLError):
    value = 1


class NVMLError_NotSupported(NVMLError):
    value = 3


class NVMLError_LibraryNotFound(NVMLError):
    value = 12


class NVMLError_DriverNotLoaded(NVMLError):
    value = 9


class NVMLError_Timeout(NVMLError):
    value = 10


class NVMLError_GpuIsLost(NVMLError):
    value = 15


NVML_MEMORY_ERROR_TYPE_CORRECTED = 0
NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
NVML_VOLATILE_ECC = 0
NVML_TEMPERATURE_GPU = 0
NVML_TEMPERATURE_THRESHOLD_SLOWDOWN = 1
nvmlEventTypeXidCriticalError = 8
nvmlClocksEventReasonHwSlowdown = 8
nvmlClocksEventReasonSwThermalSlowdown = 32
nvmlClocksEventReasonHwThermalSlowdown = 64
nvmlClocksEventReasonHwPowerBrakeSlowdown = 128

_state: dict = {}

NAME = "NVIDIA H100 80GB HBM3"
DRIVER = "550.54.15"
CUDA = 12040


@dataclass
class _Event:
    device: int
    eventType: int
    eventData: int


@dataclass
class _PciInfo:
    busId: bytes
    domain: int
    bus: int
    device: int


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int


def uuid(index: int) -> str:
    """The fake UUID of GPU ``index`` (tests compare against it)."""
    return f"GPU-{index:08x}-fa4e-4e1b-9c3d-0000000000{index:02x}"


def bus_id(index: int) -> str:
    return f"00000000:{0x18 + index:02X}:00.0"


def _supported(fn: str) -> None:
    if fn in _state["tl"].get("not_supported", []):
        raise NVMLError_NotSupported()


def _timeline() -> dict:
    with open(os.environ["FAKE_NVML_TIMELINE"]) as f:
        return json.load(f)


def nvmlInit() -> None:
    tl = _timeline()
    if tl.get("missing"):
        raise NVMLError_LibraryNotFound()
    _state.update(
        grown_to=0.0,
        t0=time.monotonic(),
        tl=tl,
        applied=0,
        xids=[],
        cued=set(),
        gpus=[
            {
                "ecc_uncorrected": 0,
                "ecc_corrected": 0,
                "remap_pending": 0,
                "remap_failed": 0,
                "retired_pending": 0,
                "clock_reasons": 0,
                "temperature": 50,
                "pcie_replays": 0,
                "lost": False,
                "processes": [],
                "power_w": tl.get("power_w", 300.0),
                "power_limit_w": 700.0,
                "energy_mj": 0.0,
            }
            for _ in range(tl.get("gpus", 1))
        ],
    )


def _advance() -> None:
    if "t0" not in _state:
        raise NVMLError_Uninitialized()
    now = time.monotonic() - _state["t0"]
    all_events = _state["tl"].get("events", [])
    events = sorted((e for e in all_events if "t" in e), key=lambda e: e["t"])
    while _state["applied"] < len(events) and events[_state["applied"]]["t"] <= now:
        _grow(events[_state["applied"]]["t"])
        _apply(events[_state["applied"]])
        _state["applied"] += 1
    _grow(now)
    for i, ev in enumerate(all_events):
        if "when_exists" in ev and i not in _state["cued"] and os.path.exists(ev["when_exists"]):
            _state["cued"].add(i)
            _apply(ev)


def _grow(t: float) -> None:
    """Every GPU's energy counter grows by its power until ``t`` (seconds after nvmlInit)."""
    dt = t - _state["grown_to"]
    if dt > 0:
        for g in _state["gpus"]:
            g["energy_mj"] += g["power_w"] * dt * 1000.0
        _state["grown_to"] = t


def _apply(ev: dict) -> None:
    if "xid" in ev:
        _state["xids"].append(_Event(ev["gpu"], nvmlEventTypeXidCriticalError, ev["xid"]))
    _state["gpus"][ev["gpu"]].update(ev.get("set", {}))


def _gpu(handle: int) -> dict:
    _advance()
    g = _state["gpus"][handle]
    if g["lost"]:
        raise NVMLError_GpuIsLost()
    return g


def nvmlShutdown() -> None:
    _state.clear()


def nvmlDeviceGetCount() -> int:
    _advance()
    return len(_state["gpus"])


def nvmlDeviceGetHandleByIndex(i: int) -> int:
    return i


def nvmlEventSetCreate() -> list:
    return []


def nvmlDeviceRegisterEvents(handle: int, types: int, event_set: list) -> None:
    event_set.append(handle)


def nvmlEventSetWait_v2(event_set: list, timeout_ms: int) -> _Event:
    _advance()
    if not _state["xids"]:
        raise NVMLError_Timeout()
    return _state["xids"].pop(0)


def nvmlDeviceGetTotalEccErrors(handle: int, kind: int, counter: int) -> int:
    g = _gpu(handle)
    return g["ecc_uncorrected"] if kind == NVML_MEMORY_ERROR_TYPE_UNCORRECTED else g["ecc_corrected"]


def nvmlDeviceGetRemappedRows(handle: int):
    g = _gpu(handle)
    return 0, 0, g["remap_pending"], g["remap_failed"]


def nvmlDeviceGetRetiredPagesPendingStatus(handle: int) -> int:
    return _gpu(handle)["retired_pending"]


def nvmlDeviceGetCurrentClocksEventReasons(handle: int) -> int:
    return _gpu(handle)["clock_reasons"]


def nvmlDeviceGetTemperature(handle: int, sensor: int) -> int:
    return _gpu(handle)["temperature"]


def nvmlDeviceGetTemperatureThreshold(handle: int, kind: int) -> int:
    return 90


def nvmlDeviceGetPcieReplayCounter(handle: int) -> int:
    return _gpu(handle)["pcie_replays"]


def nvmlDeviceGetComputeRunningProcesses(handle: int) -> list:
    g = _gpu(handle)
    _supported("nvmlDeviceGetComputeRunningProcesses")
    return [_Process(pid, 1 << 30) for pid in g["processes"]]


def nvmlSystemGetDriverVersion() -> str:
    _advance()
    _supported("nvmlSystemGetDriverVersion")
    return _state["tl"].get("driver", DRIVER)


def nvmlSystemGetCudaDriverVersion() -> int:
    _advance()
    _supported("nvmlSystemGetCudaDriverVersion")
    return _state["tl"].get("cuda", CUDA)


def nvmlDeviceGetName(handle: int) -> str:
    _gpu(handle)
    _supported("nvmlDeviceGetName")
    return NAME


def nvmlDeviceGetUUID(handle: int) -> str:
    _gpu(handle)
    _supported("nvmlDeviceGetUUID")
    return uuid(handle)


def nvmlDeviceGetPciInfo(handle: int) -> _PciInfo:
    _gpu(handle)
    _supported("nvmlDeviceGetPciInfo")
    return _PciInfo(bus_id(handle).encode(), 0, 0x18 + handle, 0)


def nvmlDeviceGetTotalEnergyConsumption(handle: int) -> int:
    g = _gpu(handle)
    _supported("nvmlDeviceGetTotalEnergyConsumption")
    return int(g["energy_mj"])


def nvmlDeviceGetEnforcedPowerLimit(handle: int) -> int:
    g = _gpu(handle)
    _supported("nvmlDeviceGetEnforcedPowerLimit")
    return int(g["power_limit_w"] * 1000)
