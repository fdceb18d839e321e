"""The ``ckptd`` command line: parses and renders; the work is in the package.

Imports of torch-heavy parts happen inside commands, so ``ckptd ls`` and
``ckptd --help`` start fast.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptd")
def main() -> None:
    """ckptd: asynchronous training snapshots, object storage and restore."""


# -- run (supervisor) -------------------------------------------------------


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@main.command("run", context_settings={"ignore_unknown_options": True})
@click.option("--store", envvar="CKPTD_STORE", required=True, help="Store URI handed to the job (CKPTD_STORE).")
@click.option("--max-restarts", type=int, default=10, show_default=True, envvar="CKPTD_MAX_RESTARTS")
@click.option("--backoff", type=float, default=1.0, show_default=True, help="Seconds before the first relaunch.")
@click.option("--grace", type=float, default=30.0, show_default=True, envvar="CKPTD_GRACE",
              help="Seconds from SIGTERM to SIGKILL.")
@click.option("--gpus", default=None, envvar="CKPTD_GPUS", help="CUDA devices, e.g. 0,1,2,3.")
@click.option("--socket", default=None, envvar="CKPTD_SOCKET", help="Daemon socket handed to the job.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run_cmd(store, max_restarts, backoff, grace, gpus, socket, command) -> None:
    """Run COMMAND, relaunching it from its newest snapshot until it succeeds.

    Exit codes: 0 done, 75 preempted (resumable), otherwise the job's own
    code once restarts are exhausted.
    """
    from rich.console import Console
    from rich.table import Table

    from .errors import CkptdError
    from .supervisor import RunConfig, Supervisor

    try:
        gpu_list = None if gpus is None else tuple(int(g) for g in gpus.split(",") if g.strip())
    except ValueError:
        raise click.ClickException(f"--gpus {gpus!r}: give device numbers like 0,1,2,3") from None
    try:
        cfg = RunConfig(store=store, command=tuple(command), max_restarts=max_restarts, backoff=backoff,
                        backoff_max=max(60.0, backoff), grace=grace, gpus=gpu_list, socket=socket)
        summary = Supervisor(cfg).run()
    except CkptdError as e:
        raise click.ClickException(str(e)) from None
    console = Console(stderr=True)
    table = Table(title=f"ckptd run: {summary.outcome} in {summary.wall_s:.1f} s, {len(summary.restarts)} restarts")
    for col in ("#", "cause", "lost steps", "detect s", "restart s", "restore s", "catch-up s", "recovery s"):
        table.add_column(col, justify="right" if col != "cause" else "left")
    for i, r in enumerate(summary.restarts, 1):
        table.add_row(str(i), r.cause, "-" if r.lost_steps is None else str(r.lost_steps), _fmt_s(r.detection_s),
                      _fmt_s(r.restart_s), _fmt_s(r.restore_s), _fmt_s(r.catch_up_s), _fmt_s(r.recovery_s))
    console.print(table)
    raise SystemExit(summary.exit_code)



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
@click.option("--gpus", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--stall", default="20s", show_default=True, help="Training stall per snapshot.")
@click.option("--persist", default="90s", show_default=True, help="Time until a snapshot is durable.")
@click.option("--size", default="10", show_default=True, help="Snapshot size in GB (storage cost).")
@click.option("--per-gpu-hour", type=float, default=None, help="Failures per GPU-hour (default: Llama 3).")
@click.option("--risk", type=float, default=1.0, show_default=True, help="Live risk multiplier.")
@click.option("--gpu-hour-usd", type=float, default=2.0, show_default=True)
@click.pass_context
def policy_cmd(ctx, gpus, stall, persist, size, per_gpu_hour, risk, gpu_hour_usd) -> None:
    """The snapshot interval the default policy picks, and where each input came from."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.console import Console
    from rich.table import Table

    from .errors import CkptdError
    from .policy import LLAMA3_PER_GPU_HOUR, PolicyContext, RiskAwarePolicy

    try:
        p = RiskAwarePolicy(fleet_rate=per_gpu_hour or LLAMA3_PER_GPU_HOUR, gpu_hour_usd=gpu_hour_usd)
        if risk > 1:
            p.raise_risk(risk, reason="--risk", now=0.0)
        d = p.decide(PolicyContext(step=0, now=0.0, steps_since=0, seconds_since=0.0, step_time=None,
                                   stall=_seconds(stall), persist=_seconds(persist), in_flight=0, gpus=gpus,
                                   nbytes=int(float(size) * 1e9)))
    except (CkptdError, ValueError) as e:
        raise click.ClickException(str(e)) from None
    rate_src = "--per-gpu-hour" if per_gpu_hour else "Llama 3 405B: 19.7 per 10^6 GPU-hours"
    table = Table(title=f"snapshot every {d['interval']:.0f} s ({d['bound']} bound)", show_header=True)
    for col in ("input", "value", "from"):
        table.add_column(col)
    table.add_row("GPUs", str(gpus), "--gpus")
    table.add_row("failure rate", f"{d['per_gpu_hour'] * 1e6:.1f} per 10^6 GPU-h", rate_src)
    table.add_row("live risk", f"x{d['risk']:.2f}", "--risk")
    table.add_row("job MTBF", f"{d['mtbf_s'] / 3600:.2f} h", "rate x GPUs x risk")
    table.add_row("stall", f"{d['stall_s']:.1f} s", "--stall (the hook measures it)")
    table.add_row("money", f"${d['dollars_per_snapshot']:.4f} = {d['money_s']:.3f} s",
                  f"S3 list prices, {size} GB, ${gpu_hour_usd}/GPU-h")
    table.add_row("persist", f"{d['persist_s']:.0f} s", "--persist (lower bound)")
    table.add_row("Daly interval", f"{d['daly']:.0f} s", "Daly (2006), C = stall + money")
    table.add_row("expected waste", f"{d['expected_waste'] * 100:.2f} %", "Daly's model with restart and persist")
    Console().print(table)


@policy_cmd.command("simulate")
@click.option("--gpus", type=click.IntRange(min=1), default=1024, show_default=True)
@click.option("--per-gpu-hour", type=float, default=None, help="Failures per GPU-hour (default: Llama 3).")
@click.option("--mtbf", default=None, help="Job MTBF instead of a per-GPU rate, e.g. 6h.")
@click.option("--kind", type=click.Choice(["exponential", "weibull", "bursty"]), default="exponential")
@click.option("--stall", default="20s", show_default=True)
@click.option("--persist", default="90s", show_default=True)
@click.option("--hours", type=float, default=168.0, show_default=True)
@click.option("--seeds", type=click.IntRange(min=2), default=20, show_default=True)
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
    sc = Scenario(gpus=gpus, per_gpu_hour=rate, kind=kind, stall=_seconds(stall), persist=_seconds(persist),
                  hours=hours)
    rows = simulate(sc, seeds=seeds)
    table = Table(title=f"{kind} failures, job MTBF {sc.mtbf / 3600:.2f} h, {seeds} seeds x {hours:.0f} h")
    for col in ("policy", "interval", "waste %", "±95%", "stall", "rework", "restart", "lost/failure s",
                "p95 s", "$/useful GPU-h"):
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in rows:
        table.add_row(r.name, r.interval, f"{r.waste * 100:.2f}", f"{r.waste_ci * 100:.2f}", f"{r.stall * 100:.2f}",
                      f"{r.rework * 100:.2f}", f"{r.restart * 100:.2f}", f"{r.loss_mean_s:.0f}",
                      f"{r.loss_p95_s:.0f}", f"{r.dollars:.3f}")
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
