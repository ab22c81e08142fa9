"""Packaging and cluster config: things a user only finds out about on a real cluster."""

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

ROOT = Path(__file__).parents[1]


def test_cluster_yaml_validates_against_rays_autoscaler_schema():
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"]["gpu_worker"]["resources"]["GPU"] >= 1
    assert config["head_node_type"] in config["available_node_types"]


def test_each_node_type_installs_exactly_one_faiss_build():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    head = " ".join(config["head_setup_commands"])
    installs = {"head": head} | {name: " ".join(t.get("worker_setup_commands", config["setup_commands"]))
                                 for name, t in config["available_node_types"].items() if name != config["head_node_type"]}
    for name, commands in installs.items():
        extras = re.findall(r"\[(cpu|gpu)\]", commands)
        gpus = config["available_node_types"][name]["resources"].get("GPU", 0)
        assert extras == (["gpu"] if gpus else ["cpu"]), name


def test_faiss_builds_are_in_separate_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("faiss") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    for name, deps in extras.items():
        builds = {d.split(">")[0].split("=")[0].split("[")[0] for d in deps if d.startswith("faiss")}
        assert len(builds) <= 1, name
    assert any(d.startswith("faiss-cpu") for d in extras["cpu"]) and any(d.startswith("faiss-gpu") for d in extras["gpu"])
    assert project["scripts"]["mllm-index"] == "pipelines.cli:main"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})), timeout=120)


def test_cli_help_for_every_command():
    for args in ([], ["index"], ["update"], ["rerank"], ["evaluate"], ["import-gt"], ["report"], ["versions"], ["rollback"], ["gc"], ["demo"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0 and "usage: mllm-index" in result.stdout


def test_cli_exits_non_zero_with_the_field_on_config_errors():
    result = run_cli("index", "g", "i", "--model", "m", "--set", "index.metric=cosine")
    assert result.returncode == 2 and "index.metric" in result.stderr and "'ip'" in result.stderr
    result = run_cli("index")
    assert result.returncode == 2 and "source.uri" in result.stderr


def test_cli_refuses_uris_outside_allowed_roots_without_leaking_secrets(tmp_path):
    secret = "s3cr3t-value-for-test"
    result = run_cli("index", str(tmp_path / "g"), "s3://other-bucket/idx", "--model", "m",
                     "--set", f"storage.allowed_roots=[{tmp_path}]", env={"AWS_SECRET_ACCESS_KEY": secret})
    assert result.returncode == 1 and "index.uri" in result.stderr and "outside the allowed roots" in result.stderr
    assert secret not in result.stdout + result.stderr


def test_ci_runs_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    command = [line for line in ci.splitlines() if line.startswith("python -m pytest")]
    assert len(command) == 1
    assert command[0] in (ROOT / "README.md").read_text()
    assert ci.index("pip install -q torch==2.13.0") < ci.index('-e ".[test]"')
