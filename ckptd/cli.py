"""The ``ckptd`` command line: parses and renders; the work is in the package.

Imports of torch-heavy parts happen inside commands, so ``ckptd ls`` and
``ckptd --help`` start fast.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptd")
@click.option("--debug", is_flag=True, help="Show the traceback of an error (also CKPTD_DEBUG=1).")
def main(debug: bool) -> None:
    """ckptd: asynchronous training snapshots, object storage and restore."""
    import os

    if debug:
        os.environ["CKPTD_DEBUG"] = "1"


# -- shared -------------------------------------------------------------------


class UserError(click.ClickException):
    """Something the user can fix (a bad option, a snapshot that does not fit): one line, exit 2."""

    exit_code = 2


def _debug() -> bool:
    import os

    return os.environ.get("CKPTD_DEBUG") == "1"


def _user_errors(fn):
    """Turn ckptd's errors into one line and a non-zero exit; the traceback only with --debug."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import CkptdError, ConfigError, IncompatibleSnapshot

        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except CkptdError as e:
            if _debug():
                raise
            kind = UserError if isinstance(e, (ConfigError, IncompatibleSnapshot)) else click.ClickException
            raise kind(str(e)) from None
        except OSError as e:
            if _debug():
                raise
            raise click.ClickException(f"{e.filename or ''}: {e.strerror or e}") from None

    return wrapper


def _open(uri: str):
    from .store import open_store

    return open_store(uri, create=False)


def _json(obj) -> None:
    import json

    click.echo(json.dumps(obj, indent=2, default=str))


def _size(n: float) -> str:
    unit = "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            break
        n /= 1024
    return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"


def _table(title: str, columns: list[str]):
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="right" if col in ("step", "size", "bytes", "change") else "left")
    return table


def _console(*, stderr: bool = False):
    """The terminal's width on a terminal; piped, no width limit, so no column is ever cut."""
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, width=None if stream.isatty() else 100_000)


def _print(table) -> None:
    _console().print(table)


# -- ls, inspect, verify --------------------------------------------------------


@main.command("ls")
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="A JSON list for scripts.")
@_user_errors
def ls_cmd(store: str, as_json: bool) -> None:
    """List the snapshots in STORE: step, created, size, tiers, state."""
    from .restore.find import list_snapshots

    infos = list_snapshots(_open(store))
    if as_json:
        _json(
            [
                {
                    "step": i.step,
                    "created": i.created.isoformat(),
                    "nbytes": i.nbytes,
                    "committed": i.committed,
                    "state": i.state,
                    "detail": i.detail,
                    "tiers": list(i.tiers),
                    "world_size": i.world_size,
                    "uri": i.uri,
                    "kind": i.kind,
                }
                for i in infos
            ]
        )
        return
    why = any(i.detail for i in infos)
    kinds = any(i.kind != "tensor" for i in infos)
    table = _table(
        f"{store}: {sum(i.committed for i in infos)} committed",
        ["step", "created", "size", "tiers", "state", "ranks"]
        + (["kind"] if kinds else [])
        + (["what it lacks"] if why else []),
    )
    for i in infos:
        state = i.state if i.committed else f"[yellow]{i.state}[/]"
        table.add_row(
            str(i.step),
            i.created.strftime("%Y-%m-%d %H:%M:%S"),
            _size(i.nbytes),
            ",".join(i.tiers),
            state,
            str(i.world_size or "-"),
            *([i.kind] if kinds else []),
            *([i.detail] if why else []),
        )
    _print(table)


@main.command("inspect")
@click.argument("store")
@click.option("--step", type=int, default=None, help="Default: the newest committed snapshot.")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts, every field in full.")
@_user_errors
def inspect_cmd(store: str, step: int | None, as_json: bool) -> None:
    """Metadata and tensor tree of a snapshot, from its manifest only (no tensor data, no unpickling)."""
    from .tools import torchsnapshot_format as tsf
    from .tools.describe import describe

    info = tsf.describe(store) if "://" not in store and tsf.is_torchsnapshot(store) else describe(_open(store), step)
    if as_json:
        _json(info)
        return
    if info.get("kind") == "process":
        _inspect_process(info)
        return
    head = [f"{k}: {info.get(k)}" for k in ("step", "created", "world_size", "host", "format") if info.get(k)]
    click.echo(
        "\n".join(
            head
            + [
                f"size: {_size(info['nbytes'])}",
                *_written(info.get("meta") or {}),
                f"metrics: {info.get('metrics', {})}",
                f"rng streams: {', '.join(info['rng']) or 'none'}",
            ]
        )
    )
    for group in dict.fromkeys(t["group"] for t in info["tensors"]):
        rows = [t for t in info["tensors"] if t["group"] == group]
        table = _table(
            f"{group}: {len(rows)} tensors, {_size(sum(t['nbytes'] for t in rows))}",
            ["name", "shape", "dtype", "bytes"],
        )
        for t in rows:
            table.add_row(t["name"], str(tuple(t["shape"])), t["dtype"], _size(t["nbytes"]))
        _print(table)
    for group, values in (info.get("groups") or {}).items():
        table = _table(f"{group}: values", ["name", "value"])
        for name, value in _leaves(values):
            table.add_row(name, value)
        _print(table)


def _inspect_process(info: dict) -> None:
    """A process image of ``ckptd run --transparent``: what ran, on what, how long it froze, its files."""
    proc = (info.get("meta") or {}).get("process") or {}
    metrics = info.get("metrics") or {}
    lines = [f"{k}: {info.get(k)}" for k in ("step", "created", "host", "format", "kind")]
    lines += [
        f"command: {' '.join(proc.get('command') or [])}",
        f"criu: {proc.get('criu', '?')}, kernel: {proc.get('kernel', '?')}, driver: {proc.get('driver') or 'none'}",
        f"size: {_size(info['nbytes'])}, frozen {metrics.get('freeze_s', float('nan')):.3f} s, "
        f"dump {metrics.get('dump_s', float('nan')):.2f} s",
    ]
    click.echo("\n".join(lines))
    table = _table(f"{len(info['files'])} CRIU image files", ["name", "bytes"])
    for f in info["files"]:
        table.add_row(f["name"], _size(f["size"]))
    _print(table)


_IO_PATHS = {
    "o_direct": "O_DIRECT from the file image",
    "buffered": "buffered (the file system refused O_DIRECT)",
    "dcp": "dcp.save, then checksummed",
}


def _written(meta: dict) -> list[str]:
    """The line saying how the snapshot reached the local tier, when its manifest records it."""
    io, secs = meta.get("io"), meta.get("write_s")
    if io is None:
        return []
    took = f" in {secs:.2f} s" if isinstance(secs, (int, float)) else ""
    return [f"written: {_IO_PATHS.get(io, io)}{took}"]


def _leaves(value, prefix: str = ""):
    """(dotted name, short text) for each plain value in a nest; lists of scalars stay on one line."""
    import json

    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix or "-", value if isinstance(value, str) else json.dumps(value)


@main.command("verify")
@click.argument("store")
@click.option("--step", type=int, default=None, help="Default: the newest committed snapshot.")
@click.option("--all", "all_", is_flag=True, help="Every committed snapshot.")
@_user_errors
def verify_cmd(store: str, step: int | None, all_: bool) -> None:
    """Recompute checksums; exit 1 listing the bad files if any snapshot does not verify."""
    from .restore.find import list_snapshots
    from .tools.describe import newest_committed
    from .tools.verify import verify_snapshot

    st = _open(store)
    steps = (
        [i.step for i in list_snapshots(st) if i.committed or i.state == "corrupt"]
        if all_
        else [newest_committed(st) if step is None else step]
    )
    bad = 0
    for s in steps:
        problems = verify_snapshot(st, s)
        bad += bool(problems)
        click.echo(f"step {s}: " + ("ok" if not problems else "CORRUPT"))
        for p in problems:
            click.echo(f"  {p}")
    if bad:
        raise SystemExit(1)


# -- restore, export, convert ---------------------------------------------------


def _progress(total: int, label: str):
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        transient=False,
    )
    task = bar.add_task(label, total=total)
    return bar, (lambda n: bar.advance(task, n))


@main.command("restore")
@click.argument("store")
@click.option("--step", type=int, default=None, help="Default: the newest committed snapshot.")
@click.option("--to", "dest", required=True, help="Local directory to write step-<N>/ into.")
@_user_errors
def restore_cmd(store: str, step: int | None, dest: str) -> None:
    """Copy a snapshot (from S3, say) into a local directory, verified.

    The copy is a plain DCP directory: dcp.load and ckptd both read it.
    """
    from .tools import torchsnapshot_format as tsf
    from .tools.copy_out import copy_out

    if "://" not in store and tsf.is_torchsnapshot(store):
        from .tools.convert import convert

        m = convert(store, dest, step=step or 0)
        click.echo(f"converted torchsnapshot {store} into {dest}/step-{m.step:012d}")
        return
    bars = []

    def progress(m):
        bar, advance = _progress(m.nbytes, f"step {m.step}")
        bar.start()
        bars.append(bar)
        return advance

    try:
        done = copy_out(
            _open(store),
            dest,
            step=step,
            progress=progress,
            skipping=lambda note: click.echo(f"ckptd: skipping {note}", err=True),
        )
    finally:
        for bar in bars:
            bar.stop()
    click.echo(f"restored step {done.manifest.step} to {done.path} (verified)")


@main.command("export")
@click.argument("store")
@click.option("--step", type=int, default=None, help="Default: the newest committed snapshot.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torch", "safetensors"]),
    default="torch",
    show_default=True,
    help="File format of OUTPUT.",
)
@click.option("-o", "--output", required=True, help="File to write.")
@click.option(
    "--only",
    type=click.Choice(["model", "optimizer", "scheduler", "extra"]),
    default=None,
    help="Export one group only (default: all).",
)
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_user_errors
def export_cmd(store, step, fmt, output, only, force) -> None:
    """Write a snapshot as one file; torch.load(FILE, weights_only=True) reads the torch one."""
    from .tools.export import export

    r = export(store, output, fmt=fmt, step=step, only=only, force=force)
    note = (
        f", {r['skipped_values']} non-tensor values left out (safetensors holds tensors only)"
        if r["skipped_values"]
        else ""
    )
    click.echo(f"wrote {r['path']}: {r['tensors']} tensors, {_size(r['bytes'])}{note}")


@main.command("convert")
@click.argument("source")
@click.argument("store")
@click.option("--step", type=int, default=0, show_default=True, help="Step to record the snapshot under.")
@_user_errors
def convert_cmd(source: str, store: str, step: int) -> None:
    """Turn a torchsnapshot snapshot at SOURCE into a ckptd snapshot in STORE."""
    from .tools.convert import convert

    m = convert(source, store, step=step)
    click.echo(f"converted {source} into {store} as step {m.step} ({_size(m.nbytes)})")


# -- gc, diff, plot -------------------------------------------------------------


@main.command("gc")
@click.argument("store")
@click.option("--keep-last", type=click.IntRange(min=1), required=True, help="Committed snapshots to keep.")
@click.option("--keep-every", type=click.IntRange(min=1), default=None, help="Also keep steps divisible by K.")
@click.option("--grace", default="1h", show_default=True, help="Age before an incomplete snapshot is garbage.")
@click.option("--dry-run", is_flag=True, help="Say what would be deleted; delete nothing.")
@_user_errors
def gc_cmd(store: str, keep_last: int, keep_every: int | None, grace: str, dry_run: bool) -> None:
    """Retention by hand; never the newest committed snapshot nor one still being written."""
    from .persist import retention

    st = _open(store)
    rule = retention.Retention(keep_last=keep_last, keep_every=keep_every, grace=_seconds(grace))
    plan = retention.plan(st, rule) if dry_run else retention.apply(st, rule)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} committed steps {plan.committed or 'none'}; incomplete {plan.incomplete or 'none'}")
    abort = getattr(st, "abort_stale_uploads", None)
    if abort is not None and not dry_run:
        click.echo(f"aborted {abort(rule.grace)} stale multipart uploads")


@main.command("diff")
@click.argument("store")
@click.argument("a", type=int)
@click.argument("b", type=int)
@click.option(
    "--top", type=click.IntRange(min=1), default=20, show_default=True, help="Show the N tensors that changed most."
)
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts, every field in full.")
@_user_errors
def diff_cmd(store: str, a: int, b: int, top: int, as_json: bool) -> None:
    """Per-tensor relative change between snapshots A and B, largest first."""
    from .tools.diff import diff

    rows = diff(store, a, b)
    if as_json:
        _json(rows)
        return
    table = _table(f"{store}: step {a} → {b}, {len(rows)} tensors", ["name", "shape", "change"])
    for r in rows[:top]:
        table.add_row(r["name"], str(tuple(r["shape"])), "only in one" if r["change"] is None else f"{r['change']:.3e}")
    _print(table)


@main.command("plot")
@click.argument("store")
@click.option("-o", "--output", required=True, help="PNG file to write.")
@_user_errors
def plot_cmd(store: str, output: str) -> None:
    """A timeline of snapshots: stall and write time, interval against risk, restarts."""
    from .tools.timeline import plot

    n = plot(_open(store), output)
    click.echo(f"wrote {output} ({n} snapshots)")


# -- goodput -------------------------------------------------------------------


@main.command("goodput")
@click.argument("store")
@click.option("--job", default=None, help="One job id (default: every job of the store, in time order).")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts, every figure and the timeline's segments.")
@click.option("--plot", "plot_path", default=None, help="Write a PNG: a stacked timeline of goodput and badput.")
@click.option("--gpus", type=click.IntRange(min=1), default=None, help="GPUs the job holds (default: as recorded).")
@click.option(
    "--gpu-hour-usd", type=click.FloatRange(min=0), default=2.0, show_default=True, help="Price of a GPU-hour."
)
@click.option(
    "--gpu-watts",
    type=click.FloatRange(min=0),
    default=700.0,
    show_default=True,
    help="Power per GPU where no daemon measured energy (an estimate, labelled as one).",
)
@click.option(
    "--no-bundle",
    is_flag=True,
    help="Leave the ledger's pages as they are (for read-only credentials); by default, where a job has "
    "many loose pages, they are bundled into a few objects so the next read is quick.",
)
@_user_errors
def goodput_cmd(store, job, as_json, plot_path, gpus, gpu_hour_usd, gpu_watts, no_bundle) -> None:
    """How much of the job's time was training: goodput, and badput by cause, in hours, dollars and kWh.

    From the ledger the hook, `ckptd run` and the daemon keep in STORE (.ckptd/ledger/). Causes:
    productive (steps whose work was kept), stall (waiting for snapshots), lost (work after the snapshot a
    failure fell back to), restart (detection, backoff, process start, restore after a failure), hang
    (until the daemon declared it), paused (no process, no GPUs held), startup (first start; the end).
    """
    from .ledger.account import AccountConfig
    from .tools import goodput as gp

    acc, problems, notes = gp.read_account(
        _open(store),
        job,
        AccountConfig(gpus=gpus, gpu_hour_usd=gpu_hour_usd, gpu_watts=gpu_watts),
        bundle=not no_bundle,
    )
    for p in problems + notes:
        click.echo(f"ckptd: {p}", err=True)
    f = acc.to_dict()
    if plot_path:
        from .ledger.plot import plot_goodput

        plot_goodput(acc, plot_path, title=store)
    if as_json:
        _json({"store": store, "job": job, "skipped": problems, **f})
        return
    _print_goodput(f, title=f"{store}{f' job {job}' if job else ''}")
    if plot_path:
        click.echo(f"wrote {plot_path}")


def _print_goodput(f: dict, *, title: str) -> None:
    from .tools import goodput as gp

    click.echo(f"{title}: {gp.headline(f)}")
    table = _table("where the time went", ["cause", "seconds", "share", "GPU-h", "$", "kWh"])
    for row in gp.cause_rows(f):
        table.add_row(*row)
    _print(table)
    click.echo(gp.money_line(f))
    click.echo(gp.energy_line(f))
    if f["failures"]:
        table = _table("failures", ["#", "cause", "lost s", "~ steps lost", "restart s", "hang s"])
        for row in gp.failure_rows(f):
            table.add_row(*row)
        _print(table)


# -- daemon, status, health -----------------------------------------------------


@main.command("daemon")
@click.option("--store", envvar="CKPTD_STORE", default=None, help="Object store for uploads (CKPTD_STORE).")
@click.option(
    "--socket",
    "socket_path",
    envvar="CKPTD_SOCKET",
    default=None,
    help="Unix socket (CKPTD_SOCKET; default $XDG_RUNTIME_DIR/ckptd.sock or /tmp/ckptd-UID/daemon.sock).",
)
@click.option(
    "--metrics-port",
    type=int,
    envvar="CKPTD_METRICS_PORT",
    default=None,
    help="Prometheus text on 127.0.0.1:PORT (CKPTD_METRICS_PORT).",
)
@click.option(
    "--poll",
    type=float,
    envvar="CKPTD_POLL",
    default=0.5,
    show_default=True,
    help="Seconds between GPU and host health polls (CKPTD_POLL).",
)
@click.option(
    "--hang-factor",
    type=float,
    envvar="CKPTD_HANG_FACTOR",
    default=10.0,
    show_default=True,
    help="A job hangs after this many median step times without a step (CKPTD_HANG_FACTOR)...",
)
@click.option(
    "--hang-floor",
    type=float,
    envvar="CKPTD_HANG_FLOOR",
    default=60.0,
    show_default=True,
    help="...but never sooner than this many seconds (CKPTD_HANG_FLOOR).",
)
@click.option(
    "--grace",
    type=float,
    envvar="CKPTD_GRACE",
    default=30.0,
    show_default=True,
    help="Seconds from the SIGTERM that stops a faulty job to its SIGKILL (CKPTD_GRACE).",
)
@click.option(
    "--log",
    "log_file",
    envvar="CKPTD_DAEMON_LOG",
    default=None,
    help="Append the daemon's log to this file (CKPTD_DAEMON_LOG; default: stderr).",
)
@click.option(
    "--max-clients",
    type=click.IntRange(min=1),
    envvar="CKPTD_MAX_CLIENTS",
    default=256,
    show_default=True,
    help="Connections served at once; more get an error reply (CKPTD_MAX_CLIENTS).",
)
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0.1),
    envvar="CKPTD_IDLE_TIMEOUT",
    default=600.0,
    show_default=True,
    help="Seconds before a silent connection is closed (CKPTD_IDLE_TIMEOUT).",
)
@click.option(
    "--ledger-every",
    type=click.FloatRange(min=0.1),
    envvar="CKPTD_LEDGER_EVERY",
    default=30.0,
    show_default=True,
    help="Seconds per GPU energy record in the goodput ledger, and between goodput refreshes (CKPTD_LEDGER_EVERY).",
)
@click.option(
    "--job",
    envvar="CKPTD_JOB",
    default=None,
    help="The job this daemon serves (CKPTD_JOB; ckptd run sets it): its GPU energy is metered from the start.",
)
@_user_errors
def daemon_cmd(
    store,
    socket_path,
    metrics_port,
    poll,
    hang_factor,
    hang_floor,
    grace,
    log_file,
    max_clients,
    idle_timeout,
    ledger_every,
    job,
) -> None:
    """The node sidecar: GPU and host health, hang detection, uploads that outlive the trainer."""
    import faulthandler
    import logging
    import os
    import signal

    from .daemon.server import default_socket
    from .daemon.service import Daemon, DaemonConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", filename=log_file)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` shows what the daemon is doing
    cfg = DaemonConfig(
        socket=socket_path or default_socket(),
        store=store,
        metrics_port=metrics_port,
        poll=poll,
        hang_factor=hang_factor,
        hang_floor=hang_floor,
        grace=grace,
        max_clients=max_clients,
        idle_timeout=idle_timeout,
        log_file=os.path.abspath(log_file) if log_file else None,
        ledger_every=ledger_every,
        job=job,
    )
    Daemon(cfg).run()


@main.command("status")
@click.option(
    "--socket",
    "socket_path",
    envvar="CKPTD_SOCKET",
    default=None,
    help="The daemon's socket (CKPTD_SOCKET; default: the node's default socket).",
)
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts, every field in full.")
@_user_errors
def status_cmd(socket_path: str | None, as_json: bool) -> None:
    """Jobs, GPUs and their health, risk and upload backlog, from the node's daemon."""
    from .daemon.client import status_of

    try:
        st = status_of(socket_path)
    except OSError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        _json(st)
        return
    click.echo(
        f"daemon pid {st['pid']} on {st['socket']}, up {st['uptime_s']:.0f} s; NVML: {st['nvml']}; "
        f"upload backlog: {st['backlog']}"
    )
    click.echo(f"daemon log: {st.get('log') or 'its stderr (started by hand without --log)'}")
    table = _table("jobs", ["job", "pid", "rank", "step", "step time s", "last snapshot", "devices", "state"])
    for j in st["jobs"]:
        table.add_row(
            j.get("job") or "-",
            str(j["pid"]),
            str(j["rank"]),
            str(j["step"]),
            "-" if j["step_time_s"] is None else f"{j['step_time_s']:.3f}",
            str(j["last_snapshot"]),
            ",".join(map(str, j["devices"])) or "all",
            j["stopping"] or "running",
        )
    _print(table)
    _print_gpus(st["gpus"], st["bad_gpus"])
    for job, f in sorted(st.get("goodput", {}).items()):
        _print_goodput(f, title=f"job {job}")


def _print_gpus(gpus: list, bad: dict) -> None:
    """One row per GPU: who it is, where it sits, who uses it, how it is. From the daemon or read here."""
    if not gpus:
        return
    drivers = sorted({(g.get("driver", "n/a"), g.get("cuda", "n/a")) for g in gpus})
    click.echo("; ".join(f"driver {d}, CUDA {c}" for d, c in drivers))
    daemon = "jobs" in gpus[0]
    table = _table("GPUs", ["gpu", "name", "uuid", "pci bus id", "jobs" if daemon else "processes", "state", "reasons"])
    for g in gpus:
        table.add_row(
            str(g["index"]),
            g.get("name", "n/a"),
            g.get("uuid", "n/a"),
            g.get("pci_bus_id", "n/a"),
            _gpu_users(g, daemon),
            g["state"] + (" (marked bad)" if str(g["index"]) in map(str, bad) else ""),
            "; ".join(g["reasons"]) or "-",
        )
    _print(table)


def _gpu_users(gpu: dict, daemon: bool) -> str:
    if daemon:
        return ", ".join(f"{j['job'] or '?'} rank {j['rank']} (pid {j['pid']})" for j in gpu["jobs"]) or "-"
    procs = gpu.get("processes")
    return "n/a" if procs is None else ", ".join(f"pid {p}" for p in procs) or "-"


@main.command("health")
@click.option("--json", "as_json", is_flag=True, help="JSON for scripts, every field in full.")
@_user_errors
def health_cmd(as_json: bool) -> None:
    """Every GPU signal and the host, read once here (no daemon involved).

    Without a GPU driver it says "no NVML" and why.
    """
    import logging
    import tempfile
    from dataclasses import asdict

    from .daemon.host import host_report
    from .daemon.nvml import NvmlHealthSource

    logging.getLogger("ckptd.daemon").setLevel(logging.ERROR)  # this is no daemon; the line below says it all
    nvml = NvmlHealthSource()
    gpus = [asdict(g) for g in nvml.poll()]
    host = asdict(host_report([tempfile.gettempdir()]))
    nvml.close()
    if as_json:
        _json({"nvml": nvml.unavailable or "ok", "gpus": gpus, "host": host})
        return
    click.echo(f"no NVML: {nvml.unavailable}" if nvml.unavailable else f"NVML: {len(gpus)} GPUs")
    _print_gpus(gpus, {})
    click.echo(
        f"host: memory {host['memory_used'] * 100:.0f}% used"
        f"{' (PRESSURE)' if host['memory_pressure'] else ''}; "
        + ", ".join(f"{p} {free * 100:.0f}% free" for p, free in host["disks"].items())
    )


# -- run (supervisor) -------------------------------------------------------


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@main.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--store", envvar="CKPTD_STORE", required=True, help="Store URI handed to the job (CKPTD_STORE).")
@click.option(
    "--max-restarts",
    type=int,
    default=10,
    show_default=True,
    envvar="CKPTD_MAX_RESTARTS",
    help="Relaunches before giving up (CKPTD_MAX_RESTARTS).",
)
@click.option("--backoff", type=float, default=1.0, show_default=True, help="Seconds before the first relaunch.")
@click.option(
    "--grace",
    type=float,
    default=30.0,
    show_default=True,
    envvar="CKPTD_GRACE",
    help="Seconds from SIGTERM to SIGKILL.",
)
@click.option("--gpus", default=None, envvar="CKPTD_GPUS", help="CUDA devices, e.g. 0,1,2,3.")
@click.option("--socket", default=None, envvar="CKPTD_SOCKET", help="Daemon socket handed to the job.")
@click.option("--no-daemon", is_flag=True, help="Do not start a node daemon (uploads run in the trainer).")
@click.option("--take-over", is_flag=True, help="Take the store from another job that is gone (its lease).")
@click.option(
    "--transparent",
    is_flag=True,
    help="Snapshot the unmodified job's processes with CRIU (as root) and restore them; no hook needed.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="With --transparent: seconds between images (default: the cost-vs-risk policy).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_user_errors
def run_cmd(
    store, max_restarts, backoff, grace, gpus, socket, no_daemon, take_over, transparent, interval, command
) -> None:
    """Run COMMAND (after --), relaunching it from its newest snapshot until it succeeds.

    Exit codes: 0 done, 75 preempted or paused (resumable), 2 a bad option
    or a job transparent mode refuses, otherwise the job's own code once
    restarts are exhausted. In a Slurm job, a
    preempted run Slurm is not ending is requeued, and a node left without
    a healthy GPU is excluded from the requeued job.
    """
    import shutil

    from rich.table import Table

    from .preempt import EXIT_PREEMPTED
    from .supervisor import RunConfig, Supervisor

    if command[0].startswith("-"):
        raise click.UsageError(
            f"no such option: {command[0]}; the job's command goes after --, "
            "e.g. ckptd run --store DIR -- python train.py"
        )
    if shutil.which(command[0]) is None:
        raise UserError(f"cannot run {command[0]!r}: no such program (give a path or a command on PATH)")
    try:
        gpu_list = None if gpus is None else tuple(int(g) for g in gpus.split(",") if g.strip())
    except ValueError:
        raise UserError(f"--gpus {gpus!r}: give device numbers like 0,1,2,3") from None
    cfg = RunConfig(
        store=store,
        command=tuple(command),
        max_restarts=max_restarts,
        backoff=backoff,
        backoff_max=max(60.0, backoff),
        grace=grace,
        gpus=gpu_list,
        socket=socket,
        daemon=not no_daemon,
        take_over=take_over,
    )
    if transparent:
        from .process.transparent import TransparentConfig, TransparentRun

        summary = TransparentRun(TransparentConfig.of(cfg, interval=interval)).run()
    elif interval is not None:
        raise click.UsageError("--interval applies to --transparent; a job with the hook snapshots on its policy")
    else:
        summary = Supervisor(cfg).run()
    console = _console(stderr=True)
    table = Table(title=f"ckptd run: {summary.outcome} in {summary.wall_s:.1f} s, {len(summary.restarts)} restarts")
    for col in ("#", "cause", "lost steps", "detect s", "restart s", "restore s", "catch-up s", "recovery s"):
        table.add_column(col, justify="right" if col != "cause" else "left")
    for i, r in enumerate(summary.restarts, 1):
        table.add_row(
            str(i),
            r.cause,
            "-" if r.lost_steps is None else str(r.lost_steps),
            _fmt_s(r.detection_s),
            _fmt_s(r.restart_s),
            _fmt_s(r.restore_s),
            _fmt_s(r.catch_up_s),
            _fmt_s(r.recovery_s),
        )
    console.print(table)
    if summary.exit_code == EXIT_PREEMPTED:
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a Slurm requeue signals us too; we are exiting 75 anyway
        Supervisor.requeue_if_preempted(summary)
    raise SystemExit(summary.exit_code)


@main.command("pause")
@click.argument("job")
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=600.0,
    show_default=True,
    help="Seconds to wait for the job's image to be made durable and its run to exit.",
)
@_user_errors
def pause_cmd(job: str, timeout: float) -> None:
    """Dump a transparent job (`ckptd run --transparent`) and stop it, freeing its GPUs.

    JOB is its job id (ckptd run prints it), the pid of its ckptd run, or its store. Its ckptd run exits
    75; the same ckptd run command resumes it.
    """
    from .process.control import pause

    record = pause(job, timeout=timeout)
    click.echo(
        f"paused job {record.job}; resume it with the same command: ckptd run --transparent --store {record.store} -- {' '.join(record.command)}"
    )


# -- policy -----------------------------------------------------------------


def _seconds(text: str) -> float:
    """'20s', '5m', '2h' or a bare number of seconds."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration; use 20s, 5m, 2h or seconds") from None


@main.group("policy", invoke_without_command=True)
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True, help="GPUs the job uses.")
@click.option(
    "--stall",
    default=None,
    help="Training stall per snapshot [default: the ledger's with --store, else 0.5s].",
)
@click.option("--persist", default="10s", show_default=True, help="Time until a snapshot is durable (lower bound).")
@click.option("--size", default=None, help="Snapshot size in GB (storage cost) [default: the ledger's, else 1].")
@click.option("--per-gpu-hour", type=float, default=None, help="Hardware failures per GPU-hour (default: Llama 3).")
@click.option(
    "--job-rate",
    type=float,
    default=None,
    help="Job-level failures per hour: software, operator, preemption (default: Llama 3's software).",
)
@click.option(
    "--failures",
    type=click.IntRange(min=0),
    default=None,
    help="Failures the job has met so far [default: the ledger's with --store, else 0].",
)
@click.option("--hours", type=float, default=None, help="Hours the job has run so far [default: as --failures].")
@click.option(
    "--store",
    default=None,
    help="Take stall, restart and lost work per failure, failures and hours from this store's goodput ledger.",
)
@click.option("--risk", type=float, default=1.0, show_default=True, help="Live risk multiplier.")
@click.option("--gpu-hour-usd", type=float, default=2.0, show_default=True, help="Price of one GPU-hour.")
@click.option("--json", "as_json", is_flag=True, help="The numbers as JSON.")
@click.pass_context
@_user_errors
def policy_cmd(
    ctx, gpus, stall, persist, size, per_gpu_hour, job_rate, failures, hours, store, risk, gpu_hour_usd, as_json
) -> None:
    """The snapshot interval the default policy picks, and the numbers it came from."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.table import Table

    from .policy import LLAMA3_JOB_PER_HOUR, LLAMA3_PER_GPU_HOUR, PolicyContext, RiskAwarePolicy

    p = RiskAwarePolicy(
        fleet_rate=LLAMA3_PER_GPU_HOUR if per_gpu_hour is None else per_gpu_hour,
        job_rate=LLAMA3_JOB_PER_HOUR if job_rate is None else job_rate,
        gpu_hour_usd=gpu_hour_usd,
    )
    if risk > 1:
        p.raise_risk(risk, reason="--risk", now=0.0)
    measured: dict = {}
    if store:
        from .ledger.account import AccountConfig
        from .tools.goodput import read_account

        measured = read_account(_open(store), None, AccountConfig(gpu_hour_usd=gpu_hour_usd))[0].policy_inputs()
        p.use_measured(
            stall=measured["stall_s"],
            restart=measured["restart_s"],
            lost=measured["lost_s"],
            source=f"ledger of {store}",
        )
    try:
        gb = float(size) if size is not None else (measured.get("snapshot_bytes") or 1e9) / 1e9
    except ValueError:
        raise UserError(f"--size {size!r}: give gigabytes, e.g. 1 or 0.5") from None
    failures_from = "--failures/--hours" if failures is not None or not measured else f"ledger of {store}"
    failures = failures if failures is not None else measured.get("failures", 0)
    hours = hours if hours is not None else measured.get("hours", 0.0)
    p.record_hours(hours)
    p.record_failure(failures)
    d = p.decide(
        PolicyContext(
            step=0,
            now=0.0,
            steps_since=0,
            seconds_since=0.0,
            step_time=None,
            stall=_seconds(stall) if stall is not None else None if measured.get("stall_s") is not None else 0.5,
            persist=_seconds(persist),
            in_flight=0,
            gpus=gpus,
            nbytes=int(gb * 1e9),
        )
    )
    if as_json:
        _json(d)
        return
    hw = "--per-gpu-hour" if per_gpu_hour is not None else "Llama 3 405B: 19.7 per 10^6 GPU-h"
    job = "--job-rate" if job_rate is not None else "Llama 3 405B software + dependency: 56 in 54 days"
    budget = p.stall_budget
    table = Table(title=f"snapshot every {_duration(d['interval'])} ({d['bound']} bound)")
    for col in ("", "number", "value", "from"):
        table.add_column(col)
    rows = [
        ("rate", "hardware", f"{d['hardware_per_hour']:.2g} /h", f"{gpus} GPU(s) x {hw}"),
        ("", "job-level", f"{d['job_per_hour']:.2g} /h", job),
        ("", "failures seen", f"{failures} in {hours:.3g} h", failures_from),
        ("", "estimate", f"{d['per_hour']:.2g} /h", "Gamma-Poisson: prior worth 5 failures, updated"),
        ("", "live risk", f"x{d['risk']:.2f}", "--risk (the daemon raises it on degraded GPUs)"),
        ("", "job MTBF", _duration(d["mtbf_s"]), "1 / (estimate x risk)"),
        ("cost", "stall", f"{d['stall_s']:.3g} s", _stall_from(stall, d, measured)),
        (
            "",
            "money",
            f"${d['dollars_per_snapshot']:.5f} = {d['money_s']:.3f} s",
            f"S3 list prices, {gb:.3g} GB kept 3 times, ${gpu_hour_usd}/GPU-h"
            + (f" (size: ledger of {store})" if size is None and measured.get("snapshot_bytes") else ""),
        ),
        ("", "C", f"{d['cost_s']:.2f} s", "stall + money"),
        ("interval", "Daly", _duration(d["daly"]), "the optimum of Daly's (2006) model for C and MTBF"),
        ("", "persist", _duration(d["persist_s"] or 0), "--persist: lower bound"),
        (
            "",
            "stall budget",
            _duration(d["stall_s"] / budget / d["risk"]) if budget and d["stall_s"] else "-",
            f"stall <= {budget:.0%} of training: lower bound" if budget else "off",
        ),
        ("", "max interval", _duration(p.max_interval), "upper bound"),
        ("", "chosen", _duration(d["interval"]), f"the {d['bound']} bound"),
        (
            "waste",
            "restart",
            _duration(d["restart_s"]),
            f"{d['restart_from']}"
            + (f": mean of {measured['failures']} failures" if d["restart_from"] != "default" else ""),
        ),
        (
            "",
            "lost / failure",
            "-" if d["lost_s"] is None else _duration(d["lost_s"]),
            f"{d['lost_from'] or 'no failure measured'}; the model expects interval/2 = {_duration(d['interval'] / 2)}",
        ),
        ("", "expected", f"{d['expected_waste'] * 100:.3f} %", "Daly's model, with restart and persist"),
    ]
    for row in rows:
        table.add_row(*row)
    _print(table)


def _stall_from(flag: str | None, d: dict, measured: dict) -> str:
    if flag is not None:
        return "--stall"
    if d["stall_from"].startswith("ledger"):
        return f"{d['stall_from']}: mean of {measured['snapshots']} snapshots"
    return "default (--stall; the hook measures it, --store reads it from the ledger)"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


@policy_cmd.command("simulate")
@click.option("--gpus", type=click.IntRange(min=1), default=1024, show_default=True, help="GPUs the job uses.")
@click.option("--per-gpu-hour", type=float, default=None, help="Failures per GPU-hour (default: Llama 3).")
@click.option("--mtbf", default=None, help="Job MTBF instead of a per-GPU rate, e.g. 6h.")
@click.option(
    "--kind",
    type=click.Choice(["exponential", "weibull", "bursty"]),
    default="exponential",
    show_default=True,
    help="How failures arrive.",
)
@click.option("--stall", default="20s", show_default=True, help="Training stall per snapshot.")
@click.option("--persist", default="90s", show_default=True, help="Time until a snapshot is durable.")
@click.option("--hours", type=float, default=168.0, show_default=True, help="Simulated hours per seed.")
@click.option(
    "--seeds", type=click.IntRange(min=2), default=20, show_default=True, help="Failure timelines to average over."
)
@click.option("--plot", "plot_path", default=None, help="Write a PNG of waste against interval.")
def policy_simulate_cmd(gpus, per_gpu_hour, mtbf, kind, stall, persist, hours, seeds, plot_path) -> None:
    """Compare policies in a seeded simulation of failures."""
    from rich.console import Console
    from rich.table import Table

    from .policy import LLAMA3_PER_GPU_HOUR
    from .policy.simulate import Scenario, simulate

    rate = per_gpu_hour or LLAMA3_PER_GPU_HOUR
    if mtbf:
        rate = 3600.0 / (_seconds(mtbf) * gpus)
    sc = Scenario(
        gpus=gpus, per_gpu_hour=rate, kind=kind, stall=_seconds(stall), persist=_seconds(persist), hours=hours
    )
    rows = simulate(sc, seeds=seeds)
    table = Table(title=f"{kind} failures, job MTBF {sc.mtbf / 3600:.2f} h, {seeds} seeds x {hours:.0f} h")
    for col in (
        "policy",
        "interval",
        "waste %",
        "±95%",
        "stall",
        "rework",
        "restart",
        "lost/failure s",
        "p95 s",
        "$/useful GPU-h",
    ):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        table.add_row(
            r.name,
            r.interval,
            f"{r.waste * 100:.2f}",
            f"{r.waste_ci * 100:.2f}",
            f"{r.stall * 100:.2f}",
            f"{r.rework * 100:.2f}",
            f"{r.restart * 100:.2f}",
            f"{r.loss_mean_s:.0f}",
            f"{r.loss_p95_s:.0f}",
            f"{r.dollars:.3f}",
        )
    Console(width=150).print(table)
    if plot_path:
        from .errors import CkptdError
        from .policy.plot import plot_waste

        try:
            plot_waste(sc, rows, plot_path, seeds=min(seeds, 10))
        except CkptdError as e:
            raise click.ClickException(str(e)) from None
        click.echo(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
