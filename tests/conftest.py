"""Shared fixtures: one local Ray per session, a real S3 endpoint (moto) on 127.0.0.1, tiny models.

Credentials for moto are fake and set before Ray starts, so Ray workers inherit them
exactly as they would inherit an instance role's environment on a cluster.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing-secret-value-123")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test that reaches for the hub fails loudly
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

TESTS = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback (moto's threaded server)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket per test; returns (bucket name, storage_options)."""
    import s3fs

    options = {"endpoint_url": s3_endpoint}
    name = f"bucket-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(**options).mkdir(name)
    return name, options


def _local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    return ray


@pytest.fixture(scope="session")
def ray_session():
    ray = _local_ray()
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_cluster():
    """A multi-node Ray as cluster.yaml has it: a 0-CPU head (it only coordinates) and two worker nodes.

    The session's local Ray is shut down for the test and started again after it, so the tests
    before and after are unaffected. Yields the `ray.cluster_utils.Cluster` and its worker nodes.
    """
    import ray
    from ray.cluster_utils import Cluster

    had_local = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster, workers
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local:
            _local_ray()


@pytest.fixture(scope="session")
def tiny_dinov2(tmp_path_factory) -> str:
    """Tiny random DINOv2 saved like a hub checkpoint, with a real saved image processor."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    path = tmp_path_factory.mktemp("tiny-dinov2")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=56, patch_size=14)).eval().save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Tiny random full CLIP (text + vision) checkpoint with its image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8),
        projection_dim=24,
    )
    CLIPModel(config).eval().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory) -> str:
    import torch
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    path = tmp_path_factory.mktemp("tiny-siglip")
    torch.manual_seed(2)
    config = SiglipConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8),
    )
    SiglipModel(config).eval().save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def planted_vlm(tmp_path_factory) -> str:
    """A tiny Qwen2-VL whose yes/no logits are +v.h / -v.h: its answer depends on the images, so
    re-ranking really reorders candidates and a score can be recomputed outside a job."""
    import torch

    from mllm_index.actors.mllm import MLLMScorer
    from mllm_index.pipelines.tiny_models import build_qwen2_vl

    path = Path(build_qwen2_vl(tmp_path_factory.mktemp("planted") / "qwen2-vl"))
    scorer = MLLMScorer(str(path))
    direction = 0.05 * torch.randn(scorer.model.lm_head.weight.shape[1], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        scorer.model.lm_head.weight[scorer.yes_ids] = direction
        scorer.model.lm_head.weight[scorer.no_ids] = -direction
    scorer.model.save_pretrained(path)
    return str(path)
