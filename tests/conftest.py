"""Fixtures shared by the suite: a real SeaweedFS S3 server on 127.0.0.1."""

from __future__ import annotations

import pytest
from _seaweed import SeaweedServer


@pytest.fixture(scope="session", autouse=True)
def no_stray_daemon(tmp_path_factory):
    """Point every hook at a socket of this session, so no daemon outside the test is joined."""
    import os

    path = str(tmp_path_factory.mktemp("sock") / "none.sock")
    old = os.environ.get("CKPTD_SOCKET")
    os.environ["CKPTD_SOCKET"] = path
    yield path
    if old is None:
        os.environ.pop("CKPTD_SOCKET", None)
    else:
        os.environ["CKPTD_SOCKET"] = old


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One SeaweedFS server for the session; tests make their own buckets."""
    server = SeaweedServer(str(tmp_path_factory.mktemp("seaweed")))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3env(seaweed, monkeypatch):
    """This process talks to the test server through the standard AWS variables."""
    if seaweed.proc is None or seaweed.proc.poll() is not None:  # an outage test left it down
        seaweed.start()
    for key, value in seaweed.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return seaweed


@pytest.fixture
def bucket(s3env):
    return s3env.make_bucket()


@pytest.fixture
def small_tmpfs(tmp_path):
    """``small_tmpfs(size)``: a real tmpfs of ``size`` (e.g. "2m") that fills; skipped without root."""
    import subprocess

    mounted = []

    def mount(size: str):
        mnt = tmp_path / f"tmpfs-{size}-{len(mounted)}"
        mnt.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(mnt)
        return mnt

    yield mount
    for mnt in mounted:
        subprocess.run(["umount", "-l", str(mnt)])
