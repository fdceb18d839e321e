"""The operator CLI, tried as a new user would: click's runner and real subprocesses, local and S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner
from test_snapshot import make, run

import ckptd
from ckptd.cli import main
from ckptd.persist.transfer import upload_snapshot
from ckptd.restore.find import read_manifest
from ckptd.store import open_store
from ckptd.store.file import FileStore


def cli(*args: str, code: int = 0) -> str:
    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == code, res.output
    return res.output


def sub(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptd.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


@pytest.fixture
def local(tmp_path):
    store = tmp_path / "store"
    model, *_ = run(store, 6)
    return str(store), model


def test_ls_and_inspect_json(local):
    store, _ = local
    rows = json.loads(cli("ls", store, "--json"))
    assert [r["step"] for r in rows] == [1, 3, 5] and all(r["committed"] for r in rows)
    assert {"step", "created", "nbytes", "committed"} <= set(rows[0])
    info = json.loads(cli("inspect", store, "--json"))
    assert info["step"] == 5 and info["nbytes"] > 0 and "torch" in info["rng"]
    names = {t["name"]: t for t in info["tensors"]}
    assert names["model.0.weight"] == {
        "name": "model.0.weight",
        "group": "model",
        "shape": [64, 8],
        "dtype": "float32",
        "nbytes": 2048,
    }
    assert "model: " in cli("inspect", store, "--step", "3")


def test_ls_and_inspect_never_import_torch_and_answer_fast(local):
    store, _ = local
    code = (
        "import sys, time; t=time.perf_counter(); from ckptd.cli import main; "
        "sys.argv=['ckptd', '{cmd}', {store!r}, '--json']\n"
        "try:\n  main()\nexcept SystemExit: pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', time.perf_counter()-t, file=sys.stderr)"
    )
    for cmd in ("ls", "inspect"):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = subprocess.run(
                [sys.executable, "-c", code.format(cmd=cmd, store=store)], capture_output=True, text=True, timeout=60
            )
            times.append(time.perf_counter() - t0)
            assert "NOTORCH" in out.stderr, out.stderr
        assert sorted(times)[1] < 1.5, f"ckptd {cmd}: {times}"


def test_verify_catches_a_flipped_byte_and_a_truncated_file(local):
    store, _ = local
    assert "step 5: ok" in cli("verify", store)
    victim = os.path.join(store, "step-000000000005", "__0_0.distcp")
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 3] ^= 0x10
    open(victim, "wb").write(bytes(data))
    out = cli("verify", store, code=1)
    assert "CORRUPT" in out and "__0_0.distcp" in out
    meta = os.path.join(store, "step-000000000003", ".metadata")
    open(meta, "r+b").truncate(10)
    out = sub("verify", store, "--all")
    assert out.returncode == 1 and "step 1: ok" in out.stdout and ".metadata" in out.stdout


def test_export_torch_loads_weights_only_into_a_fresh_model(local, tmp_path):
    store, model = local
    out = tmp_path / "model.pt"
    cli("export", store, "--format", "torch", "-o", str(out), "--only", "model")
    fresh, *_ = make(seed=42)
    fresh.load_state_dict(torch.load(out, weights_only=True))
    for a, b in zip(fresh.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert "exists" in sub("export", store, "-o", str(out)).stderr
    full = torch.load(cli_out(store, tmp_path / "all.pt"), weights_only=True)
    assert set(full) >= {"model", "optimizer", "scheduler", "meta"}
    st = tmp_path / "model.safetensors"
    cli("export", store, "--format", "safetensors", "-o", str(st), "--only", "model")
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(st))["0.weight"], model[0].weight.detach())


def cli_out(store: str, path) -> str:
    cli("export", store, "-o", str(path))
    return str(path)


def test_restore_gc_diff_plot(local, tmp_path):
    store, _ = local
    dest = tmp_path / "copy"
    assert "restored step 3" in cli("restore", store, "--step", "3", "--to", str(dest))
    import torch.distributed.checkpoint as dcp

    fresh, *_ = make(seed=3)
    sd = {"model": fresh.state_dict()}
    dcp.load(sd, checkpoint_id=str(dest / "step-000000000003"))
    assert "would delete committed steps [1, 3]" in cli("gc", store, "--keep-last", "1", "--dry-run")
    assert [r["step"] for r in json.loads(cli("ls", store, "--json"))] == [1, 3, 5]
    cli("gc", store, "--keep-last", "2")
    assert [r["step"] for r in json.loads(cli("ls", store, "--json"))] == [3, 5]
    rows = json.loads(cli("diff", store, "3", "5", "--json"))
    assert rows[0]["change"] >= rows[-1]["change"] > 0
    png = tmp_path / "timeline.png"
    assert "2 snapshots" in cli("plot", store, "-o", str(png))
    assert png.read_bytes()[:4] == b"\x89PNG"
    from ckptd.tools.timeline import points

    paths = {r["io"] for r in points(FileStore(store))}
    assert len(paths) == 1 and paths <= {"o_direct", "buffered"}, "the timeline knows each write's path"
    said = {"o_direct": "written: O_DIRECT from the file image", "buffered": "written: buffered"}[paths.pop()]
    assert said in cli("inspect", store)


def test_user_errors_are_one_line_with_a_non_zero_exit(tmp_path):
    for args, needle in (
        (["ls", "gs://bucket/x"], "unknown scheme"),
        (["inspect", str(tmp_path / "nothing")], "does not exist"),
        (["inspect", str(tmp_path), "--step", "4"], "no committed snapshot of step 4"),
    ):
        res = sub(*args)
        assert res.returncode != 0 and needle in res.stderr, res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_errors_users_cause_exit_2_in_one_line_and_debug_shows_the_traceback(tmp_path):
    for args in (
        ["run", "--store", str(tmp_path), "--bogus", "--", "x"],
        ["run", "--store", str(tmp_path), "--", "no-such-program-here"],
        ["policy", "--per-gpu-hour", "0", "--job-rate", "0"],
    ):
        res = sub(*args)
        assert res.returncode == 2, res.stderr
        assert "Traceback" not in res.stderr and "Error:" in res.stderr
        assert len([line for line in res.stderr.splitlines() if line.startswith("Error")]) == 1
    res = sub("policy", "--per-gpu-hour", "0", "--job-rate", "0", env={"CKPTD_DEBUG": "1"})
    assert "Traceback" in res.stderr and "ConfigError" in res.stderr
    assert "Traceback" in sub("--debug", "policy", "--per-gpu-hour", "0", "--job-rate", "0").stderr


def test_torchsnapshot_is_inspected_exported_and_converted(tmp_path):
    import torchsnapshot

    model, opt, _, _ = make(seed=5)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    src = str(tmp_path / "ts")
    torchsnapshot.Snapshot.take(src, app_state={"model": model, "optim": opt})
    info = json.loads(cli("inspect", src, "--json"))
    assert {t["name"] for t in info["tensors"]} >= {"model.0.weight", "optim.state.0.exp_avg"}
    out = tmp_path / "m.pt"
    cli("export", src, "-o", str(out), "--only", "model")
    assert torch.equal(torch.load(out, weights_only=True)["0.weight"], model[0].weight.detach())
    dest = str(tmp_path / "converted")
    cli("convert", src, dest, "--step", "100")
    m2, o2, s2, _ = make(seed=9)
    with ckptd.Checkpointer(dest, model=m2, optimizer=o2, policy="every:1000") as ck:
        with pytest.warns(UserWarning, match="no RNG state"):
            assert ck.restore() == 101
    assert torch.equal(m2[0].weight, model[0].weight)
    assert o2.state_dict()["state"][0]["exp_avg"].equal(opt.state_dict()["state"][0]["exp_avg"])


def test_commands_on_seaweedfs(s3env, tmp_path):
    bucket = s3env.make_bucket()
    local = tmp_path / "local"
    run(local, 4)
    remote = open_store(f"s3://{bucket}/run")
    for step in (1, 3):
        upload_snapshot(FileStore(str(local)), step, remote)
    uri = f"s3://{bucket}/run"
    env = s3env.env()
    res = sub("ls", uri, "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert [(r["step"], r["tiers"]) for r in json.loads(res.stdout)] == [(1, ["s3"]), (3, ["s3"])]
    assert json.loads(sub("inspect", uri, "--json", env=env).stdout)["step"] == 3
    assert "step 3: ok" in sub("verify", uri, env=env).stdout
    res = sub("restore", uri, "--to", str(tmp_path / "back"), env=env)
    assert res.returncode == 0 and (tmp_path / "back" / "step-000000000003" / "ckptd.json").exists()
    assert sub("export", uri, "-o", str(tmp_path / "x.pt"), "--only", "model", env=env).returncode == 0
    assert "deleted committed steps [1]" in sub("gc", uri, "--keep-last", "1", env=env).stdout
    after = sub("ls", uri, env=env).stdout  # what gc said it removed is gone: no empty "incomplete" row
    assert "1970" not in after and "incomplete" not in after, after
    assert [r["step"] for r in json.loads(sub("ls", uri, "--json", env=env).stdout)] == [3]
    remote.put_bytes(read_manifest(remote, 3).object_key("__0_0.distcp"), b"damaged")
    bad = sub("verify", uri, env=env)
    assert bad.returncode == 1 and "__0_0.distcp" in bad.stdout
    res = sub("ls", "s3://no-such-bucket-here/x", env=env)
    assert res.returncode == 1 and "does not exist" in res.stderr and len(res.stderr.splitlines()) == 1


def test_the_readme_commands_say_what_they_do():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "scripts", "install.sh")) as f:
        install = f.read()
    with open(os.path.join(root, "README.md")) as f:
        test = [line for line in f if "pytest" in line and line.startswith("bash scripts/install.sh")]
    with open(os.path.join(root, ".ci", "run")) as f:
        assert test and test[0] in f.read(), ".ci/run must run exactly the README's test command"
    assert "--quiet" not in install and install.count("step ") >= 3  # each install step is announced
    assert test and all(" -q" not in line for line in test)  # one line per file, not bare dots
    assert any("--durations=" in line for line in test)  # the slowest tests at the end


def test_every_option_has_help_and_short_helps_are_whole_sentences():
    import click

    def walk(cmd, path):
        yield path, cmd
        for name, sub_cmd in getattr(cmd, "commands", {}).items():
            yield from walk(sub_cmd, path + [name])

    for path, cmd in walk(main, ["ckptd"]):
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                assert p.help, f"{' '.join(path)} {p.opts[0]} has no help text"
    restore = main.commands["restore"].get_short_help_str(80)
    assert restore.endswith("verified."), restore


def test_piped_tables_are_not_cut_and_health_names_no_daemon(tmp_path):
    from torch import nn

    long = "a_module_with_a_name_long_enough_to_overflow_eighty_columns_easily"
    model = nn.ModuleDict({long: nn.Linear(2, 2)})
    with ckptd.Checkpointer(str(tmp_path / "s"), model=model, policy="every:1000") as ck:
        ck.save(1)
    out = sub("inspect", str(tmp_path / "s")).stdout
    assert f"model.{long}.weight" in out and "…" not in out
    health = sub("health")
    assert health.returncode == 0 and "daemon" not in health.stdout + health.stderr


def test_restore_into_an_existing_directory_fails_before_any_progress(local, tmp_path):
    store, _ = local
    (tmp_path / "copy" / "step-000000000005").mkdir(parents=True)
    res = sub("restore", store, "--to", str(tmp_path / "copy"))
    assert res.returncode == 2 and "already exists" in res.stderr
    assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1
