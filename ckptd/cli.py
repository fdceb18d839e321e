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


if __name__ == "__main__":
    main()
