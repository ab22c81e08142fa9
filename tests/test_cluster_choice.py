"""Which Ray the CLI runs on, on a machine where a killed `ray start --head` left its address file behind.

Each CLI runs in a subprocess whose RAY_TMPDIR is a directory of this test's own, holding a stale
ray_current_cluster file: Ray reads the file from there, so no other test or Ray on the machine sees it.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image

from mllm_index.pipelines.demo import bundled_photos
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import read_manifest

pytestmark = pytest.mark.e2e
TIMEOUT_S = 3


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cli:
    """The CLI in a subprocess; each stderr line is stamped when it arrives, so a bound is checked on the message
    itself, not on the interpreter's start-up or exit (seconds each on a loaded machine)."""

    def __init__(self, args: list[str], ray_tmpdir: str, **env: str):
        base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.proc = subprocess.Popen([sys.executable, "-m", "mllm_index.pipelines.cli", *args],
                                     env=base | {"RAY_TMPDIR": ray_tmpdir} | env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend((time.time(), line) for line in self.proc.stderr))
        self.reader.start()

    def finish(self, timeout_s: float = 300) -> tuple[int, str]:
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"still running after {timeout_s}s") from None
        finally:
            self.reader.join()
        return self.proc.returncode, "".join(line for _, line in self.lines)

    def seconds_between(self, first: str, last: str) -> float:
        """From the log line holding `first` (by its own timestamp) to the arrival of the line holding `last`."""
        start = next(line for _, line in self.lines if first in line)
        end = next(at for at, line in self.lines if last in line)
        return end - datetime.strptime(start[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_the_cli_never_joins_a_recorded_cluster_and_bounds_an_explicit_join(tmp_path, tiny_dinov2):
    ray_tmpdir = tempfile.mkdtemp(prefix="rcc", dir="/tmp")  # short: Ray's unix socket paths must stay under 108 bytes
    stale = f"127.0.0.1:{_closed_port()}"
    (Path(ray_tmpdir) / "ray").mkdir()
    (Path(ray_tmpdir) / "ray" / "ray_current_cluster").write_text(stale)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for path in bundled_photos()[:2]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((96, 96))
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        (gallery / f"{path.stem}.jpg").write_bytes(buf.getvalue())
    silent = socket.create_server(("0.0.0.0", 0))  # accepts TCP, never speaks GCS: what a wrong port looks like
    silent_address = f"127.0.0.1:{silent.getsockname()[1]}"
    timeout = f"run.connect_timeout_s={TIMEOUT_S}"
    index_args = ["index", str(gallery), str(tmp_path / "index"), "--model", tiny_dinov2]
    clis: list[_Cli] = []
    try:
        # All three at once, each in its own process: no address; the stale address given in the config (as a
        # user would copy it); $RAY_ADDRESS naming a port that does not answer.
        local = _Cli(index_args, ray_tmpdir)
        given = _Cli([*index_args, "--set", f"run.ray_address={stale}", "--set", timeout], ray_tmpdir)
        env_join = _Cli([*index_args, "--set", timeout], ray_tmpdir, RAY_ADDRESS=silent_address)
        clis = [local, given, env_join]

        # Nothing listens at the stale address: connection refused, retried until the deadline, then exit 1.
        code, err = given.finish()
        assert code == 1 and f"cannot reach the Ray cluster at {stale}" in err and "(run.ray_address)" in err, err
        assert f"within {TIMEOUT_S}s (run.connect_timeout_s)" in err and "Connection refused" in err, err
        assert TIMEOUT_S - 0.5 <= given.seconds_between("joining the Ray cluster", "cannot reach") < TIMEOUT_S + 2, err

        # A port that accepts but never answers as a GCS: Ray's connect would retry for minutes; the watchdog ends it.
        code, err = env_join.finish()
        assert code == 1 and f"the Ray cluster at {silent_address}" in err, err
        assert f"($RAY_ADDRESS) did not answer within {TIMEOUT_S}s (run.connect_timeout_s)" in err, err
        assert env_join.seconds_between("joining the Ray cluster", "did not answer") < TIMEOUT_S + 2, err

        # No address: a local Ray of its own, in its own temp dir, and the job runs on it.
        code, err = local.finish()
        assert code == 0, err[-3000:]
        assert "starting a local Ray" in err and "joining the Ray cluster" not in err and "Failed to connect to GCS" not in err
        assert list((Path(ray_tmpdir) / "ray").glob("session_2*")), "no local Ray session was started in RAY_TMPDIR"
        assert read_manifest(Location(str(tmp_path / "index"))).counts.indexed == 2
    finally:
        silent.close()
        for cli in clis:
            if cli.proc.poll() is None:
                cli.proc.kill()
                cli.finish()
        shutil.rmtree(ray_tmpdir, ignore_errors=True)


def test_the_address_comes_from_the_config_then_ray_address_else_a_local_ray(monkeypatch):
    from mllm_index.pipelines.cluster import choose_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert choose_address(None) == (None, "local")
    assert choose_address("local") == (None, "local")
    assert choose_address("auto") == ("auto", "run.ray_address")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what `ray job submit` sets for the job's driver
    assert choose_address(None) == ("10.0.0.5:6379", "$RAY_ADDRESS")
    assert choose_address("10.0.0.9:6379") == ("10.0.0.9:6379", "run.ray_address")
    assert choose_address("local") == (None, "local")


def test_an_address_that_is_not_a_gcs_address_fails_naming_it():
    from mllm_index.pipelines.cluster import ClusterUnreachable, init_ray

    for address, expected in (("http://127.0.0.1:8265", "job server's"), ("127.0.0.1", "Invalid address format"), ("ray://head", "expected host:port")):
        with pytest.raises(ClusterUnreachable, match=re.escape(address) + ".*" + re.escape(expected)):
            init_ray(address, connect_timeout_s=1)


def test_inside_a_submitted_job_no_runtime_env_is_added(monkeypatch):
    """Ray refuses a driver runtime_env that repeats a variable of the job's, and the entrypoint inherits them."""
    from mllm_index.pipelines.cluster import forwarded_runtime_env

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert forwarded_runtime_env()["env_vars"]["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"env_vars": {"HF_HUB_OFFLINE": "1"}}}')
    assert forwarded_runtime_env() is None


def test_a_working_directory_deleted_while_joining_is_entered_again(tmp_path, monkeypatch):
    """What Ray does to a submitted job's driver when another node on the machine re-extracts the working_dir."""
    from mllm_index.pipelines.cluster import return_to

    work = tmp_path / "job"
    work.mkdir()
    monkeypatch.chdir(work)
    shutil.rmtree(work)
    threading.Timer(0.3, work.mkdir).start()  # the fresh copy, under the same path
    return_to(str(work), wait_s=5)
    assert os.getcwd() == str(work)
    monkeypatch.chdir(tmp_path)
