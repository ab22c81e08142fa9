"""Index versions: `versions/vNNNNNN/` folders, `manifest.json` written last, `LATEST` swapped after.

A reader resolves LATEST and then reads only that version's manifest-listed files, so it
sees the old version or the new one, never a partial one. A version folder without a
manifest is work in progress; a re-run with the same job fingerprint resumes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from mllm_index.storage.contracts import Manifest, ManifestError, parse_manifest
from mllm_index.storage.uris import Location, redact

VERSION_PATTERN = re.compile(r"^v(\d{6})$")
MANIFEST, LATEST, RUN = "manifest.json", "LATEST", "run.json"


def version_name(number: int) -> str:
    return f"v{number:06d}"


def list_versions(index: Location) -> list[str]:
    """All version folders, published or not, oldest first."""
    return [n for n in index.list_names("versions") if VERSION_PATTERN.match(n)]


def is_published(index: Location, version: str) -> bool:
    return index.exists("versions", version, MANIFEST)


def read_latest(index: Location) -> str | None:
    """Name of the live version, or None for an index that has never been published."""
    if not index.exists(LATEST):
        return None
    name = index.read_text(LATEST).strip()
    if not VERSION_PATTERN.match(name):
        raise ValueError(f"{index!r}: LATEST holds {name!r}, not a version name")
    return name


def read_manifest(index: Location, version: str | None = None) -> Manifest:
    """Manifest of a version (the live one by default), validated; older formats are upgraded on read."""
    version = version or read_latest(index)
    if version is None:
        raise FileNotFoundError(f"{index!r} has no published version (no LATEST)")
    if not is_published(index, version):
        raise FileNotFoundError(f"{index!r}: version {version} is not published (no manifest)")
    where = f"index {redact(index.uri)}, version {version}"
    try:
        data = index.read_json("versions", version, MANIFEST)
    except ValueError as exc:  # not JSON at all
        raise ManifestError(f"{where}: manifest.json is not valid JSON ({exc})") from None
    return parse_manifest(data, where)


def fingerprint(settings: dict[str, Any]) -> str:
    """Hash of the settings that decide a version's content; equal hashes may share work."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def begin_version(index: Location, run_fingerprint: str, settings: dict[str, Any]) -> tuple[str, bool]:
    """Pick the version folder for a run: (name, resumed).

    The newest unpublished folder is resumed when its fingerprint matches; otherwise a
    new number is taken (an abandoned folder with other settings is left for cleanup).
    """
    names = list_versions(index)
    if names and not is_published(index, names[-1]) and index.exists("versions", names[-1], RUN):
        if index.read_json("versions", names[-1], RUN).get("fingerprint") == run_fingerprint:
            return names[-1], True
    number = int(VERSION_PATTERN.match(names[-1]).group(1)) + 1 if names else 1
    name = version_name(number)
    index.write_json(
        {"fingerprint": run_fingerprint, "settings": settings, "parent": read_latest(index), "started_at": time.time()},
        "versions",
        name,
        RUN,
    )
    return name, False


def publish(index: Location, manifest: Manifest) -> Manifest:
    """Write the manifest (the version is complete from here on), then point LATEST at it."""
    manifest = manifest.model_copy(update={"published_at": time.time()})
    index.write_json(manifest.model_dump(mode="json"), "versions", manifest.version, MANIFEST)
    index.write_text(manifest.version + "\n", LATEST)
    return manifest


def version_table(index: Location) -> list[dict]:
    """One row per version folder: published or not, live or not, counts and times."""
    live = read_latest(index)
    rows = []
    for name in list_versions(index):
        m = read_manifest(index, name) if is_published(index, name) else None
        run = index.read_json("versions", name, RUN) if index.exists("versions", name, RUN) else {}
        rows.append({"version": name, "live": name == live, "published": m is not None,
                     "published_at": m and m.published_at, "started_at": run.get("started_at"),
                     "parent": m.parent if m else run.get("parent"), "indexed": m and m.counts.indexed,
                     "model": m and m.model and m.model.name, "factory": m and m.factory, "format": m and m.format})
    return rows


def rollback(index: Location, version: str) -> None:
    """Point LATEST at an earlier (published) version; readers switch on their next open."""
    if not VERSION_PATTERN.match(version) or not is_published(index, version):
        published = [r["version"] for r in version_table(index) if r["published"]]
        raise ValueError(f"{version} is not a published version of {index!r} (published: {', '.join(published) or 'none'})")
    index.write_text(version + "\n", LATEST)


def collect_garbage(index: Location, keep: int, protected: set[str] = frozenset()) -> dict[str, list[str]]:
    """Delete published versions beyond the newest `keep`, except the live one and `protected` (leased)
    ones, and abandoned unpublished folders older than the newest published version.

    Call it holding the index lock: then no writer is working in any folder it deletes.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    live = read_latest(index)
    rows = version_table(index)
    published = [r["version"] for r in rows if r["published"]]
    newest = published[-1] if published else None
    keep_set = set(published[-keep:]) | {live} | set(protected)
    deleted, kept = [], []
    for r in rows:
        name = r["version"]
        abandoned = not r["published"] and newest is not None and name < newest
        if (r["published"] and name not in keep_set) or (abandoned and name not in protected):
            index.delete("versions", name)
            deleted.append(name)
        else:
            kept.append(name)
    return {"deleted": deleted, "kept": kept}
