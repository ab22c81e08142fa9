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
        extras = [e.strip() for group in re.findall(r"mllm-index\[([\w,\s]+)\]", commands) for e in group.split(",")]
        gpus = config["available_node_types"][name]["resources"].get("GPU", 0)
        assert [e for e in extras if e in ("cpu", "gpu")] == (["gpu"] if gpus else ["cpu"]), name


def test_the_head_installs_the_job_server_and_the_node_providers_sdk():
    """`ray job submit` needs the head's job server (ray[default]); the AWS autoscaler needs boto3 there."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    cluster = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cluster"]
    assert {re.split(r"[<>=!~ ]", d)[0] for d in cluster} >= {"ray[default]", "boto3"}
    head = " ".join(config["head_setup_commands"])
    assert re.search(r"mllm-index\[[\w,]*\bcluster\b[\w,]*\]", head), head
    assert any("--include-dashboard=true" in c for c in config["head_start_ray_commands"])  # fail at `ray up`, not at submit
    # Every node installs against the same pins, so a worker started later gets the head's Ray version.
    for commands in [config["head_setup_commands"]] + [t["worker_setup_commands"] for t in config["available_node_types"].values()
                                                      if "worker_setup_commands" in t]:
        repo = [c for c in commands if "~/mllm-index[" in c]
        assert len(repo) == 1 and "-c ~/mllm-index/.ci/constraints.txt" in repo[0], commands
    # What [cluster] brings is importable here ([test] includes it): the job server and the AWS node provider.
    probe = "import ray.dashboard.modules.job.job_head, ray.autoscaler._private.aws.node_provider, boto3"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).returncode == 0


def test_constraints_pin_every_installed_distribution():
    """.ci/constraints.txt must pin everything `.[test]` installs, or pip backtracks (boto3/botocore) in CI."""
    pinned = {re.split("==", line)[0].lower().replace("_", "-") for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines()
              if "==" in line}
    needed = _requirement_closure("mllm-index", {"test", "cpu", "classic", "cluster"})
    missing = sorted(n for n in needed - {"mllm-index", "torch"} if n not in pinned)
    assert not missing, missing


def test_faiss_builds_are_in_separate_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("faiss") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    for name, deps in extras.items():
        builds = {d.split(">")[0].split("=")[0].split("[")[0] for d in deps if d.startswith("faiss")}
        assert len(builds) <= 1, name
    assert any(d.startswith("faiss-cpu") for d in extras["cpu"]) and any(d.startswith("faiss-gpu") for d in extras["gpu"])
    assert project["scripts"]["mllm-index"] == "mllm_index.pipelines.cli:main"


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mllm_index.pipelines.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=120)


USER_PACKAGES = {  # what a user's own repository often holds, next to where they run `ray job submit --working-dir .`
    "configs/__init__.py": "MINE = 'the user configs package'\n",
    "configs/schema.py": "raise ImportError('the user configs.schema was imported instead of mllm_index.configs.schema')\n",
    "storage/__init__.py": "raise ImportError('the user storage package was imported')\n",
    "pipelines/__init__.py": "raise ImportError('the user pipelines package was imported')\n",
}


def test_the_wheel_installs_one_namespace_that_user_packages_cannot_shadow(tmp_path):
    """Build the wheel, install it into a fresh venv (its dependencies borrowed from this one), and
    import it from a working directory holding its own configs/, storage/ and pipelines/ packages."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("mllm_index-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"mllm_index"}, tops  # nothing else lands in site-packages
    assert "mllm_index/pipelines/data/photos/Dune.jpg" in names and "mllm_index/configs/gallery.yaml" in names
    assert not any(n.startswith("mllm_index/tests/") or n.startswith("mllm_index/benchmarks/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in sys.path if p.endswith("site-packages")]
    # A plain path entry, not a site dir: this venv's editable finder (its own .pth) is not run there.
    (Path(site) / "borrowed_dependencies.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, timeout=300)

    work = tmp_path / "user-repo"
    for rel, text in USER_PACKAGES.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    probe = ("import configs, mllm_index, mllm_index.configs.schema as s, mllm_index.storage.versions, "
             "mllm_index.pipelines.cli\n"
             "assert configs.MINE and s.__file__.startswith(%r), s.__file__\n"
             "from mllm_index import IndexJobConfig, IndexSearcher, run_index, run_rerank, run_update, evaluate\n"
             "print('ok', mllm_index.__file__)") % site
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(work)}
    result = subprocess.run([str(python), "-c", probe], cwd=work, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("ok " + site), result.stderr
    cli = subprocess.run([str(venv / "bin" / "mllm-index"), "index", "g", "i", "--model", "m", "--set", "model.pooling=max"],
                         cwd=work, capture_output=True, text=True, env=env, timeout=120)
    assert cli.returncode == 2 and "model.pooling" in cli.stderr, cli.stderr


def test_cli_help_for_every_command():
    for args in ([], ["index"], ["update"], ["rerank"], ["evaluate"], ["import-gt"], ["report"], ["versions"], ["rollback"], ["gc"], ["verify"], ["demo"]):
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


def _requirement_closure(root: str, extras: set[str]) -> set[str]:
    """Distribution names that installing root[extras] pulls in, read from the installed metadata (torch not followed:
    its build is chosen by hand before the constraints apply)."""
    from importlib.metadata import PackageNotFoundError, requires
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [(root, frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        key = (canonicalize_name(name), wanted)
        if key in seen:
            continue
        seen.add(key)
        if key[0] == "torch":
            continue
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in wanted | {""}):
                todo.append((req.name, frozenset(req.extras)))
    return {name for name, _ in seen}
