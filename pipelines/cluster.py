"""Which Ray a command runs on: a cluster it is told to join, or a local one of its own."""

from __future__ import annotations

import logging
import os

# Where storage and models live, not who may read them: forwarded to the job's workers, which
# may belong to a cluster started with another environment. Credentials are never forwarded
# (they would be stored in Ray's job table); workers get them from their own environment or role.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION",
                 "HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_HOME", "TRANSFORMERS_OFFLINE")


def init_ray(address: str | None, connect_timeout_s: float = 60.0) -> None:
    """Join the cluster of a `ray job submit` ($RAY_ADDRESS) or a given one; else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    ray.init(address=address, include_dashboard=False if not address else None, logging_level=logging.WARNING,
             ignore_reinit_error=True, runtime_env={"env_vars": env_vars} if env_vars else None)
