"""GPU health and identity through NVML (nvidia-ml-py), or any module with pynvml's names.

The module comes from $CKPTD_NVML_MODULE (default ``pynvml``), so a
simulator or a test's fake can stand in. No driver or library is the normal
"no NVML" state, reported with its reason, never as healthy. An identity
field an older driver does not support (NVMLError_NotSupported) reads "n/a".
"""

from __future__ import annotations

import importlib
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..ledger.energy import GpuEnergy

log = logging.getLogger("ckptd.daemon")

# NVIDIA's XID catalogue: errors whose resolution is a GPU reset or a node reboot.
FATAL_XIDS = frozenset({48, 61, 62, 64, 74, 79, 95, 109, 110, 119, 120, 121, 136, 140, 143})
DEGRADED_XIDS = frozenset({63, 92})
APP_ONLY_XIDS = frozenset({13, 31, 43, 45, 68, 94})

CORRECTED_ECC_SPIKE = 100
"""New corrected ECC errors between two polls that count as a spike."""
PCIE_REPLAY_SPIKE = 100
"""New PCIe replays between two polls that count as above normal."""
SLOWDOWN_MARGIN_C = 5
"""Degrees below the slowdown threshold that already count as too hot."""
SUSTAINED_POLLS = 2
"""Polls in a row a hardware/thermal/power-brake slowdown must last."""
NA = "n/a"
"""What an identity field reads when the driver cannot tell."""


@dataclass(frozen=True)
class GpuIdentity:
    """What a GPU is and where it sits; read once, since none of it changes while the driver is loaded."""

    name: str = NA
    uuid: str = NA
    pci_bus_id: str = NA
    driver: str = NA
    cuda: str = NA


@dataclass
class GpuReport:
    """One GPU's state after a poll: ok, degraded, fatal, or app (an application-only XID)."""

    index: int
    state: str = "ok"
    reasons: list[str] = field(default_factory=list)
    signals: dict[str, Any] = field(default_factory=dict)
    name: str = NA
    uuid: str = NA
    pci_bus_id: str = NA
    driver: str = NA
    cuda: str = NA
    processes: list[int] | None = None
    """Pids NVML sees computing on this GPU; None when the driver cannot tell."""

    def add(self, state: str, reason: str) -> None:
        order = ("ok", "app", "degraded", "fatal")
        if order.index(state) > order.index(self.state):
            self.state = state
        self.reasons.append(reason)


class NvmlHealthSource:
    """Polls every GPU's health signals. Not thread-safe: one owner (the daemon loop)."""

    def __init__(self, module: str | None = None) -> None:
        self.module_name = module or os.environ.get("CKPTD_NVML_MODULE", "pynvml")
        self.unavailable: str | None = None
        self.nvml: Any = None
        self.handles: list[Any] = []
        self.identities: list[GpuIdentity] = []
        self._events = None
        self._prev: dict[int, dict[str, int]] = {}
        self._slow: dict[int, int] = {}
        self._unsupported: set[tuple[int, str]] = set()
        try:
            self.nvml = importlib.import_module(self.module_name)
            self.nvml.nvmlInit()
            self.handles = [self.nvml.nvmlDeviceGetHandleByIndex(i) for i in range(self.nvml.nvmlDeviceGetCount())]
        except ImportError as e:
            self.unavailable = f"cannot import {self.module_name}: {e}"
        except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded...: the "no NVML" state
            self.unavailable = f"{type(e).__name__}: {e}"
        if self.unavailable:
            log.warning("ckptd daemon: no NVML: %s; watching the host only", self.unavailable)
            return
        self.identities = self._identify()
        self._register_events()

    def _identify(self) -> list[GpuIdentity]:
        n = self.nvml
        driver = _read(n, "nvmlSystemGetDriverVersion")
        cuda = _read(n, "nvmlSystemGetCudaDriverVersion")
        if cuda.isdigit():
            cuda = f"{int(cuda) // 1000}.{int(cuda) % 1000 // 10}"  # 12040 -> 12.4
        out = []
        for h in self.handles:
            pci = _read(n, "nvmlDeviceGetPciInfo", h, raw=True)
            bus_id = _text(getattr(pci, "busId", None)) if pci != NA else NA
            out.append(
                GpuIdentity(
                    name=_read(n, "nvmlDeviceGetName", h),
                    uuid=_read(n, "nvmlDeviceGetUUID", h),
                    pci_bus_id=bus_id or NA,
                    driver=driver,
                    cuda=cuda,
                )
            )
        return out

    def _register_events(self) -> None:
        try:
            self._events = self.nvml.nvmlEventSetCreate()
            for h in self.handles:
                self.nvml.nvmlDeviceRegisterEvents(h, self.nvml.nvmlEventTypeXidCriticalError, self._events)
        except Exception as e:  # some GPUs do not support events; polling still works
            log.warning("ckptd daemon: XID events unavailable (%s); polling counters only", e)
            self._events = None

    def poll(self) -> list[GpuReport]:
        """The state of every GPU now; XIDs since the last poll included."""
        if self.unavailable:
            return []
        reports = [GpuReport(i, **asdict(ident)) for i, ident in enumerate(self.identities)]
        for index, xid in self._drain_xids():
            if 0 <= index < len(reports):
                _classify_xid(reports[index], xid)
        for report, handle in zip(reports, self.handles):
            self._counters(report, handle)
            report.processes = self._processes(handle)
        return reports

    def energy(self) -> list[GpuEnergy]:
        """Each GPU's total-energy counter (mJ) and enforced power limit (W), None where unsupported."""
        if self.unavailable:
            return []
        out = []
        for i, h in enumerate(self.handles):
            mj = self._optional(i, "nvmlDeviceGetTotalEnergyConsumption", h)
            limit = self._optional(i, "nvmlDeviceGetEnforcedPowerLimit", h)
            out.append(GpuEnergy(i, None if mj is None else int(mj), None if limit is None else limit / 1000.0))
        return out

    def _optional(self, index: int, fn: str, *args: Any) -> Any:
        """``fn(*args)``, or None; a function the GPU does not support is not asked again."""
        if (index, fn) in self._unsupported:
            return None
        try:
            return getattr(self.nvml, fn)(*args)
        except AttributeError:
            self._unsupported.add((index, fn))
        except self.nvml.NVMLError as e:
            if type(e).__name__ in ("NVMLError_NotSupported", "NVMLError_FunctionNotFound"):
                self._unsupported.add((index, fn))
        return None

    def _processes(self, h: Any) -> list[int] | None:
        try:
            return sorted(int(p.pid) for p in self.nvml.nvmlDeviceGetComputeRunningProcesses(h))
        except (self.nvml.NVMLError, AttributeError):  # not supported, or the GPU is lost (reported already)
            return None

    def _drain_xids(self) -> list[tuple[int, int]]:
        if self._events is None:
            return []
        out = []
        while True:
            try:
                ev = self.nvml.nvmlEventSetWait_v2(self._events, 0)
            except self.nvml.NVMLError_Timeout:
                return out
            except self.nvml.NVMLError as e:
                log.warning("ckptd daemon: reading XID events failed: %s", e)
                return out
            index = next((i for i, h in enumerate(self.handles) if h == ev.device), -1)
            out.append((index, int(ev.eventData)))

    def _counters(self, report: GpuReport, h: Any) -> None:
        n = self.nvml
        try:
            unc = n.nvmlDeviceGetTotalEccErrors(h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC)
            corr = n.nvmlDeviceGetTotalEccErrors(h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC)
            _corr_rows, _unc_rows, pending, failed = n.nvmlDeviceGetRemappedRows(h)
            retired_pending = n.nvmlDeviceGetRetiredPagesPendingStatus(h)
            reasons = n.nvmlDeviceGetCurrentClocksEventReasons(h)
            temp = n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)
            slow_at = n.nvmlDeviceGetTemperatureThreshold(h, n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN)
            replays = n.nvmlDeviceGetPcieReplayCounter(h)
        except n.NVMLError_GpuIsLost:
            report.add("fatal", "GPU is lost (fallen off the bus)")
            return
        except n.NVMLError as e:
            report.signals["error"] = str(e)
            return
        report.signals.update(
            ecc_uncorrected=unc,
            ecc_corrected=corr,
            remap_pending=bool(pending),
            remap_failed=bool(failed),
            retired_pending=bool(retired_pending),
            clock_reasons=reasons,
            temperature=temp,
            slowdown_temperature=slow_at,
            pcie_replays=replays,
        )
        prev = self._prev.get(report.index, {"corr": corr, "replays": replays})
        self._prev[report.index] = {"corr": corr, "replays": replays}
        if unc > 0:
            report.add("fatal", f"volatile double-bit ECC errors: {unc}")
        if failed:
            report.add("fatal", "row remapping failed")
        if pending or retired_pending:
            report.add("degraded", "pending row remap / page retirement")
        if corr - prev["corr"] >= CORRECTED_ECC_SPIKE:
            report.add("degraded", f"corrected ECC spike: +{corr - prev['corr']}")
        if replays - prev["replays"] >= PCIE_REPLAY_SPIKE:
            report.add("degraded", f"PCIe replays: +{replays - prev['replays']}")
        if slow_at and temp >= slow_at - SLOWDOWN_MARGIN_C:
            report.add("degraded", f"temperature {temp} C near slowdown at {slow_at} C")
        slow_mask = (
            n.nvmlClocksEventReasonHwSlowdown
            | n.nvmlClocksEventReasonHwThermalSlowdown
            | n.nvmlClocksEventReasonSwThermalSlowdown
            | n.nvmlClocksEventReasonHwPowerBrakeSlowdown
        )
        self._slow[report.index] = self._slow.get(report.index, 0) + 1 if reasons & slow_mask else 0
        if self._slow[report.index] >= SUSTAINED_POLLS:
            report.add("degraded", f"sustained clock slowdown (reasons 0x{reasons:x})")

    def close(self) -> None:
        if self.nvml is not None and not self.unavailable:
            try:
                self.nvml.nvmlShutdown()
            except Exception:  # shutting down; nothing to report to
                pass


def _classify_xid(report: GpuReport, xid: int) -> None:
    if xid in FATAL_XIDS:
        report.add("fatal", f"XID {xid} (reset or reboot required)")
    elif xid in DEGRADED_XIDS:
        report.add("degraded", f"XID {xid}")
    elif xid in APP_ONLY_XIDS:
        report.add("app", f"XID {xid} (kills the application; the GPU stays in use)")
    else:
        report.add("degraded", f"XID {xid} (unclassified)")


def _read(nvml: Any, fn: str, *args: Any, raw: bool = False) -> Any:
    """``nvml.fn(*args)``, or "n/a" when this driver or module does not have or support it."""
    try:
        value = getattr(nvml, fn)(*args)
    except (nvml.NVMLError, AttributeError) as e:  # NotSupported, FunctionNotFound, an old module
        log.info("ckptd daemon: %s unavailable: %s", fn, e)
        return NA
    return value if raw else (_text(value) or NA)


def _text(value: Any) -> str:
    """pynvml returns str from its decorated calls but bytes from struct fields (PCI busId)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace").rstrip("\x00")
    return "" if value is None else str(value)
