"""No pickle from storage; credentials never in output, summaries, tables or error messages."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from galleries import write_files
from inputs import odd_files

from mllm_index.storage.uris import Location

ROOT = Path(__file__).parents[1]
PACKAGES = ("actors", "storage", "pipelines", "configs")
ALLOWED_PICKLE = {("storage/ground_truth.py", "import_revisitop")}  # explicit, local, user-requested conversion


def calls(path: Path):
    """Every call in a file, with the name of its innermost enclosing function."""
    tree = ast.parse(path.read_text())
    owner = {id(n): "<module>" for n in ast.walk(tree) if isinstance(n, ast.Call)}
    for func in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        for node in ast.walk(func):  # outer functions come first in ast.walk, so inner ones overwrite
            if isinstance(node, ast.Call):
                owner[id(node)] = func.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield owner[id(node)], node


def test_no_code_path_unpickles_storage_data():
    offenders = []
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            for func, call in calls(path):
                name = ast.unparse(call.func)
                kwargs = {k.arg: ast.unparse(k.value) for k in call.keywords}
                if name in ("pickle.load", "pickle.loads", "torch.load", "joblib.load") and (rel, func) not in ALLOWED_PICKLE:
                    offenders.append(f"{rel}:{call.lineno} {name}")
                if name == "np.load" and kwargs.get("allow_pickle") != "False":
                    offenders.append(f"{rel}:{call.lineno} np.load without allow_pickle=False")
                loads_weights = name.endswith("from_pretrained") and not any(w in name.lower() for w in ("config", "processor"))
                if loads_weights and kwargs.get("use_safetensors") != "True":
                    offenders.append(f"{rel}:{call.lineno} {name} may load a pickled .bin checkpoint")
    assert not offenders, offenders


@pytest.mark.e2e
def test_a_planted_secret_never_leaks(ray_session, s3_bucket, tiny_dinov2, tmp_path):
    bucket, options = s3_bucket
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]  # the real credential the job authenticates with
    source = Location(f"s3://{bucket}/gallery", options)
    write_files(source, {k: v[0] for k, v in list(odd_files().items())[:4]} | {"bad/x.jpg": b"<html>no</html>"})
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONPATH=str(ROOT),
               AWS_ENDPOINT_URL=options["endpoint_url"])
    run = subprocess.run([sys.executable, "-m", "mllm_index.pipelines.cli", "index", source.uri, f"s3://{bucket}/index", "--model",
                          tiny_dinov2, "--json"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    failing = subprocess.run([sys.executable, "-m", "mllm_index.pipelines.cli", "index", f"s3://{bucket}/missing", f"s3://{bucket}/i2",
                              "--model", tiny_dinov2], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert failing.returncode == 1
    written = b"".join(Location(f"s3://{bucket}", options).fs.cat_file(p)
                       for p in Location(f"s3://{bucket}", options).fs.find(bucket))
    for text in (run.stdout, run.stderr, failing.stdout, failing.stderr, written.decode("latin-1")):
        assert secret not in text
