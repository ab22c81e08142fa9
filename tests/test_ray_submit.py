"""`ray job submit` against a real two-node cluster: what users run, with the processes a head and a worker run.

The cluster is started by `ray start` (head with the dashboard and its job server, plus one worker) in a
temp dir of its own and on free ports, so it neither joins nor disturbs any other Ray on the machine
(the session's `ray_session`, other tests' clusters); it is stopped by signalling exactly the processes
this test started. Jobs go in through `JobSubmissionClient` with a `working_dir`, as `ray job submit
--working-dir . -- mllm-index index ...` sends them.
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from mllm_index.pipelines.demo import bundled_photos
from mllm_index.storage.search import IndexSearcher
from mllm_index.storage.uris import Location
from mllm_index.storage.versions import read_manifest

pytestmark = pytest.mark.e2e
N_IMAGES = 4


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`ray start --block`: the command stays up and takes its own processes down when signalled."""
    ray_cli = str(Path(sys.executable).parent / "ray")
    return subprocess.Popen([ray_cli, "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(predicate, timeout_s: float, what: str, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready:\n" + "\n".join(p.read_text()[-3000:] for p in logs if p.exists()))


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _processes_under(temp_dir: str) -> list[int]:
    """Pids of processes whose command line names this cluster's temp dir (its raylets, GCS, agents, workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture
def cluster():
    """A head (0 CPUs, dashboard and job server, as cluster.yaml has it) and one 2-CPU worker, from `ray start`."""
    temp = tempfile.mkdtemp(prefix="rsub", dir="/tmp")  # short: Ray's unix socket paths must stay under 108 bytes
    (gcs, dashboard, client, *ports) = _free_ports(15)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # RAY_TMPDIR: whatever Ray writes to its default temp dir (the ray_current_cluster file included) lands in ours.
    env |= {"RAY_TMPDIR": temp, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # SIGTERM stops a node at once (default: drain for 30 s)
    logs = [Path(temp) / "head.log", Path(temp) / "worker.log"]

    def node_ports(p: list[int]) -> list[str]:
        return [f"--node-manager-port={p[0]}", f"--object-manager-port={p[1]}", f"--metrics-export-port={p[2]}",
                f"--dashboard-agent-listen-port={p[3]}", f"--dashboard-agent-grpc-port={p[4]}",
                f"--runtime-env-agent-port={p[5]}"]

    procs = [_ray_start(["--head", f"--port={gcs}", f"--temp-dir={temp}/ray", "--num-cpus=0", "--num-gpus=0",
                         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                         "--object-store-memory=100000000",
                         f"--ray-client-server-port={client}", *node_ports(ports[:6])], env, logs[0])]
    try:
        _wait_for(lambda: _accepts(gcs), 120, "head's GCS", procs, logs)  # the worker joins while the head's dashboard starts
        procs.append(_ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=2", "--num-gpus=0",
                                 "--object-store-memory=100000000", *node_ports(ports[6:12])], env, logs[1]))
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_nodes

        address = f"http://127.0.0.1:{dashboard}"

        def two_nodes_alive() -> bool:
            try:
                return sum(n.state == "ALIVE" for n in list_nodes(address=address, raise_on_missing_output=False)) == 2
            except Exception:  # the dashboard is still starting
                return False

        _wait_for(two_nodes_alive, 120, "worker", procs, logs)
        yield JobSubmissionClient(address), address
    finally:
        for proc in reversed(procs):  # worker first, then the head
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        leftovers = _processes_under(temp)
        for pid in leftovers:  # only what this cluster started: their command lines name its temp dir
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)


def _wait_job(client, job_id: str, timeout_s: float = 300):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(1)
    client.stop_job(job_id)
    raise AssertionError(f"job {job_id} still {status} after {timeout_s}s:\n{client.get_job_logs(job_id)[-3000:]}")


def test_ray_job_submit_runs_the_index_job_and_reports_config_errors(cluster, tmp_path, tiny_dinov2):
    client, address = cluster
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for path in bundled_photos()[:N_IMAGES]:
        img = Image.open(path).convert("RGB")
        img.thumbnail((96, 96))
        buf = io.BytesIO()
        img.save(buf, "JPEG")
        (gallery / f"{path.stem}.jpg").write_bytes(buf.getvalue())
    index_uri = str(tmp_path / "index")
    # The working dir is what `--working-dir .` uploads: here only the job's config, read relative to it.
    work = tmp_path / "job"
    work.mkdir()
    (work / "job.yaml").write_text(yaml.safe_dump({
        "source": {"uri": str(gallery)}, "index": {"uri": index_uri}, "model": {"name": tiny_dinov2},
        "run": {"part_size": 2}, "decode": {"batch_size": 2}, "embed": {"batch_size": 2}}))
    # Each job its own working-dir package (they are named by content): two jobs that start at the same instant
    # with the same package can race in Ray's runtime-env agent (seen here once: the second job's dir was empty).
    bad_work = tmp_path / "bad-job"
    bad_work.mkdir()
    (bad_work / "gallery.yaml").write_text((work / "job.yaml").read_text())
    good = client.submit_job(entrypoint="mllm-index index --config job.yaml", runtime_env={"working_dir": str(work)})
    bad = client.submit_job(entrypoint="mllm-index index --config gallery.yaml --set model.pooling=max",
                            runtime_env={"working_dir": str(bad_work)})
    assert _wait_job(client, bad, 120).value == "FAILED"
    bad_logs = client.get_job_logs(bad)
    assert "model.pooling" in bad_logs and "'auto', 'cls', 'mean' or 'gem'" in bad_logs and "'max'" in bad_logs, bad_logs
    info = client.get_job_info(bad)
    assert "exit code 2" in (info.message or ""), info.message  # a config error, not a crash

    status = _wait_job(client, good)
    logs = client.get_job_logs(good)
    assert status.value == "SUCCEEDED", logs[-4000:]
    manifest = read_manifest(Location(index_uri))
    assert manifest.version == "v000001" and manifest.counts.indexed == N_IMAGES and manifest.counts.failed == 0
    assert manifest.model.name == tiny_dinov2
    assert IndexSearcher(index_uri, load_vectors=False).ntotal == N_IMAGES
    assert "v000001" in logs
    # The driver joined this cluster (through $RAY_ADDRESS, which the job server sets), and the worker node did the
    # work: a driver that started a Ray of its own would leave no driver record and no actors here.
    from ray.util.state import list_actors, list_nodes

    driver = client.get_job_info(good).driver_info
    assert driver is not None, logs[-3000:]
    head = {n.node_id: n.is_head_node for n in list_nodes(address=address, raise_on_missing_output=False)}
    actors = list_actors(address=address, filters=[("job_id", "=", driver.id)], detail=True, raise_on_missing_output=False)
    assert any(not head[a.node_id] for a in actors), [(a.class_name, a.node_id) for a in actors]
