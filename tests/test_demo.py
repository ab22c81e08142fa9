"""`mllm-index demo` end to end (offline backends), and its HTML report in a real headless Chromium."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllm_index.storage.uris import Location
from mllm_index.storage.verify import verify_version
from mllm_index.storage.versions import read_manifest
from mllm_index.pipelines.demo import run_demo

pytestmark = pytest.mark.e2e


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    raise AssertionError("the report test needs a Chromium: apt-get install chromium (Debian's package; .ci/run installs it)")


def browser(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]
    return subprocess.run([chromium(), *flags, *args], capture_output=True, text=True, timeout=120)


def test_demo_reranking_raises_map_and_the_report_renders(ray_session, tmp_path):
    summary = run_demo(str(tmp_path / "demo"))
    rows = {(r["condition"], r["ranking"]): r for r in summary["evaluation"]["rows"]}
    assert rows[("all", "reranked")]["AP"] > rows[("all", "knn")]["AP"]  # on its own set, re-ranking must help
    for condition in ("viewpoint_scale", "occluded", "small_in_clutter", "photometric"):
        assert (condition, "reranked") in rows
    assert summary["index"]["counts"]["failed"] == 3  # the demo's broken files, in the failures table
    assert summary["rerank"]["queries"]["ok"] == 18
    index = Location(str(tmp_path / "demo" / "index"))
    assert all(ref.sha256 for ref in read_manifest(index).files())  # codebook, catalog and failures included
    assert verify_version(index, summary["index"]["version"]).ok

    report = Path(summary["report"])
    dom = browser("--virtual-time-budget=10000", "--dump-dom", report.as_uri(), profile=tmp_path / "p1").stdout
    assert 'data-broken="0"' in dom, dom[:500]  # every thumbnail decoded: no broken-image placeholders
    images = int(dom.split('data-images="')[1].split('"')[0])
    assert images >= 12 * (1 + 2 * 8)  # 12 queries, each with 8 kNN and 8 re-ranked results
    shot = tmp_path / "report.png"
    browser("--window-size=1200,1600", f"--screenshot={shot}", report.as_uri(), profile=tmp_path / "p2")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # not a blank page
    assert (np.abs(pixels - [42, 157, 58]).sum(-1) < 40).sum() > 500  # green "correct" borders were drawn
