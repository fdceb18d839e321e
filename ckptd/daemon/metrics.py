"""Prometheus text on 127.0.0.1: jobs, steps, snapshots, backlog, GPU health, identity and jobs, goodput."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge, start_http_server

_STATES = {"ok": 0, "app": 1, "degraded": 2, "fatal": 3}


class Metrics:
    """Gauges updated once per daemon tick. Thread-safe (prometheus_client is)."""

    def __init__(self, port: int) -> None:
        self.registry = CollectorRegistry()
        g = lambda name, doc, labels=(): Gauge(name, doc, labels, registry=self.registry)  # noqa: E731
        self.jobs = g("ckptd_jobs", "Registered trainer processes")
        self.step = g("ckptd_job_step", "Last step a job reported", ["pid", "rank"])
        self.step_time = g("ckptd_job_step_seconds", "Median step time", ["pid", "rank"])
        self.last_snapshot = g("ckptd_job_last_snapshot_step", "Newest snapshot a job committed", ["pid", "rank"])
        self.backlog = g("ckptd_upload_backlog", "Snapshots committed locally, not yet durable")
        self.gpu_state = g("ckptd_gpu_health", "0 ok, 1 application XID, 2 degraded, 3 fatal", ["gpu"])
        self.gpu_info = g(
            "ckptd_gpu_info",
            "Always 1: a GPU's identity in its labels",
            ["gpu", "name", "uuid", "pci_bus_id", "driver", "cuda"],
        )
        self.gpu_job = g("ckptd_gpu_job", "Always 1: a job's rank on a GPU", ["gpu", "uuid", "job", "pid", "rank"])
        self.bad = g("ckptd_bad_gpus", "GPUs marked bad")
        # The goodput ledger's figures, as `ckptd goodput STORE --job JOB --json` gives them (refreshed by the daemon).
        self.goodput = g("ckptd_goodput_ratio", "Productive time over the time the job held its GPUs", ["job"])
        self.productive = g("ckptd_productive_seconds_total", "Seconds of steps whose work was kept", ["job"])
        self.badput = g("ckptd_badput_seconds_total", "Seconds not spent on kept work, by cause", ["job", "cause"])
        self.energy = g("ckptd_energy_joules_total", "GPU energy by cause (measured or estimated)", ["job", "cause"])
        self.server, self.thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)

    def update(self, daemon: Any) -> None:
        status = daemon.status()
        self.jobs.set(len(status["jobs"]))
        for j in status["jobs"]:
            labels = (str(j["pid"]), str(j["rank"]))
            if j["step"] is not None:
                self.step.labels(*labels).set(j["step"])
            if j["step_time_s"] is not None:
                self.step_time.labels(*labels).set(j["step_time_s"])
            if j["last_snapshot"] is not None:
                self.last_snapshot.labels(*labels).set(j["last_snapshot"])
        self.backlog.set(status["backlog"])
        self.gpu_job.clear()  # a job that left must leave no series behind
        for gpu in status["gpus"]:
            index = str(gpu["index"])
            self.gpu_state.labels(index).set(_STATES.get(gpu["state"], 0))
            self.gpu_info.labels(index, gpu["name"], gpu["uuid"], gpu["pci_bus_id"], gpu["driver"], gpu["cuda"]).set(1)
            for j in gpu["jobs"]:
                self.gpu_job.labels(index, gpu["uuid"], j["job"], str(j["pid"]), str(j["rank"])).set(1)
        self.bad.set(len(status["bad_gpus"]))
        for job, f in status.get("goodput", {}).items():
            self.goodput.labels(job).set(f["goodput_ratio"])
            self.productive.labels(job).set(f["seconds"]["productive"])
            for cause, seconds in f["badput_s"].items():
                self.badput.labels(job, cause).set(seconds)
            for cause, joules in f["energy_j"].items():
                self.energy.labels(job, cause).set(joules)

    def close(self) -> None:
        self.server.shutdown()
