"""Which Ray a command runs on: a cluster it is told to join, or a local one of its own.

Joining is explicit: `run.ray_address` (an address or `auto`) or `$RAY_ADDRESS` (which `ray job submit`
sets for the job's driver). Without either, the command starts its own local Ray, never the cluster that
a `ray start` recorded on this machine (Ray's `ray.init(address=None)` joins the one named in
<temp dir>/ray_current_cluster, and when that cluster is gone, e.g. a killed `ray start --head`, it hangs
retrying "Failed to connect to GCS at address ...").

Joining is bounded by `run.connect_timeout_s`. Ray's own connect is not: against a dead or wrong address
`ray.init` retries the GCS handshake RAY_NUM_REDIS_GET_RETRIES (20) times, ~35 s each in Ray 2.60 (a 5 s
connect plus a 30 s cluster-id wait), about 12 minutes; measured here, it was still blocked after 200 s.
Its knobs (RAY_NUM_REDIS_GET_RETRIES, RAY_gcs_server_port_wait_time_s, the C++ gRPC timeouts) are internal,
change between versions, and only shorten pieces of that loop. So the join is bounded in two steps that
need nothing from Ray:
1. a TCP probe of the GCS port, retried until the deadline: a stale address, a dead head, a wrong host or
   a closed port fail here with the OS's reason;
2. `ray.init` itself under a watchdog for the rest of the budget: a port that accepts but never answers
   as a GCS (the dashboard's port 8265 given by mistake, a GCS that is stuck, a proxy that accepts any
   connection) ends the process with exit 1 and a message naming the address, since a thread cannot interrupt Ray's blocking C++ connect (running `ray.init`
   in another thread instead would lose the SIGTERM handler that `ray job stop` relies on).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
import time

# Where storage and models live, not who may read them: forwarded to the job's workers, which
# may belong to a cluster started with another environment. Credentials are never forwarded
# (they would be stored in Ray's job table); workers get them from their own environment or role.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")

log = logging.getLogger(__name__)


class ClusterUnreachable(RuntimeError):
    """The Ray cluster named by run.ray_address / $RAY_ADDRESS did not answer within run.connect_timeout_s."""


def choose_address(address: str | None) -> tuple[str | None, str]:
    """The cluster to join (None: start a local Ray) and where that choice came from, for messages."""
    if address == "local":
        return None, "local"
    if address:
        return address, "run.ray_address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    return None, "local"


def init_ray(address: str | None, connect_timeout_s: float = 60.0) -> None:
    """Join the given cluster ($RAY_ADDRESS inside `ray job submit`) within connect_timeout_s, else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    target, origin = choose_address(address)
    options = dict(logging_level=logging.WARNING, runtime_env=forwarded_runtime_env())
    if target is None:
        log.info("starting a local Ray (no run.ray_address, no $RAY_ADDRESS)")
        # "local", not None: None would make Ray join whatever cluster its temp dir records.
        ray.init(address="local", include_dashboard=False, **options)
        return

    deadline = time.monotonic() + connect_timeout_s
    host, port, shown = _resolve(target, origin)
    log.info("joining the Ray cluster at %s; giving up after %gs (run.connect_timeout_s)", shown, connect_timeout_s)
    _wait_for_port(host, port, deadline, shown, connect_timeout_s)
    failure = (f"the Ray cluster at {shown} did not answer within {connect_timeout_s:g}s "
               f"(run.connect_timeout_s); is {host}:{port} the cluster's GCS port (6379 by default, not the "
               "dashboard's 8265), and is this machine one of its nodes?")
    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), _give_up, args=(failure,))
    watchdog.daemon = True
    watchdog.start()
    cwd = os.getcwd()
    try:
        ray.init(address=target, **options)
    except Exception as exc:  # Ray's own connect errors, whatever their type, become one with the address
        raise ClusterUnreachable(f"could not join the Ray cluster at {shown}: {exc}") from exc
    finally:
        watchdog.cancel()
    return_to(cwd)


def return_to(cwd: str, wait_s: float = 10.0) -> None:
    """Re-enter the driver's working directory if joining deleted it.

    Inside `ray job submit` the driver runs in the job's extracted working_dir. When the driver joins,
    Ray installs the job's runtime env on every node; a node that shares the head's Ray temp dir (two
    `ray start` on one machine) extracts the package again under the same path, deleting the driver's
    directory under it: the next relative path (`import transformers` resolves one) fails with
    FileNotFoundError. The fresh copy appears under the same path; wait for it, else go to the temp dir."""
    try:
        os.getcwd()
        return
    except FileNotFoundError:
        pass
    deadline = time.monotonic() + wait_s
    while not os.path.isdir(cwd) and time.monotonic() < deadline:
        time.sleep(0.1)
    if os.path.isdir(cwd):
        os.chdir(cwd)
    else:
        log.warning("the working directory %s was deleted while joining the cluster; continuing in %s", cwd,
                    tempfile.gettempdir())
        os.chdir(tempfile.gettempdir())


def forwarded_runtime_env() -> dict | None:
    """The FORWARDED_ENV variables set here, as a runtime_env for the workers; None inside `ray job submit`.

    In a submitted job the submitter's runtime_env is the workers' environment (env vars go in
    `--runtime-env-json`; workers also inherit the nodes' own), and Ray refuses a driver runtime_env
    that sets a variable the job's also sets (the entrypoint inherits the job's variables, so
    forwarding them would do exactly that)."""
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # set by Ray's job manager for the entrypoint
        return None
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return {"env_vars": env_vars} if env_vars else None


def _resolve(target: str, origin: str) -> tuple[str, int, str]:
    """Host and GCS port behind an address as Ray would resolve it (`auto`: the cluster `ray start` recorded)."""
    from ray._private.services import canonicalize_bootstrap_address

    shown = f"{target} ({origin})"
    if "://" in target and not target.startswith("ray://"):
        raise ClusterUnreachable(f"cannot join the Ray cluster at {shown}: expected host:port of the GCS, `auto` "
                                 "or ray://host:port (an http:// address is the job server's, for `ray job submit`)")
    try:
        resolved = target[len("ray://"):] if target.startswith("ray://") else canonicalize_bootstrap_address(target)
    except (ConnectionError, ValueError) as exc:  # `auto` with no recorded cluster; an address Ray cannot parse
        raise ClusterUnreachable(f"cannot join the Ray cluster at {shown}: {exc}") from exc
    host, sep, port = (resolved or "").rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterUnreachable(f"cannot join the Ray cluster at {shown}: expected host:port (got {resolved!r})")
    if resolved != target:
        shown = f"{target} -> {resolved} ({origin})"
    return host.strip("[]"), int(port), shown


def _wait_for_port(host: str, port: int, deadline: float, shown: str, timeout_s: float) -> None:
    """Retry a TCP connect until the deadline: a head that is still starting gets its chance, a dead one fails."""
    while True:
        left = deadline - time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=max(min(left, 5.0), 0.1)):
                return
        except OSError as exc:
            if deadline - time.monotonic() <= 0.25:
                raise ClusterUnreachable(f"cannot reach the Ray cluster at {shown} within {timeout_s:g}s "
                                         f"(run.connect_timeout_s): {exc or type(exc).__name__}") from exc
            time.sleep(min(0.25, max(deadline - time.monotonic() - 0.25, 0.0)))


def _give_up(message: str) -> None:
    """Watchdog: Ray's connect is blocked in C++ and cannot be interrupted, so the process ends here (exit 1)."""
    print(f"mllm-index: error: {message}", file=sys.stderr, flush=True)
    os._exit(1)
