"""Index versions: `versions/vNNNNNN/` folders, `manifest.json` written last, `LATEST` swapped after.

A reader resolves LATEST and then reads only that version's manifest-listed files, so it
sees the old version or the new one, never a partial one. A version folder without a
manifest is work in progress (a re-run with the same job fingerprint resumes it), or retired:
a deleted version whose folder keeps the files that later versions still reference.
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
MANIFEST, LATEST, RUN, RETIRED = "manifest.json", "LATEST", "run.json", "retired.json"


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
    """One row per version folder: published or not, live or not, retired (deleted, files still
    referenced by later versions) or in progress, counts and times."""
    live = read_latest(index)
    rows = []
    for name in list_versions(index):
        m = read_manifest(index, name) if is_published(index, name) else None
        run = index.read_json("versions", name, RUN) if index.exists("versions", name, RUN) else {}
        retired = m is None and index.exists("versions", name, RETIRED)
        rows.append({"version": name, "live": name == live, "published": m is not None, "retired": retired,
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

    Versions reference files in earlier versions' folders, so deleting a version deletes its
    manifest and every file of its folder that no kept version (kept, live, leased, or a run in
    progress) references; files still referenced stay, and the folder is marked retired until a
    later collection finds them unreferenced too. Returns the versions deleted (manifests gone),
    the folders left retired, and the versions kept.

    Call it holding the index lock: then no writer is working in any folder it deletes.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    live = read_latest(index)
    rows = version_table(index)
    published = [r["version"] for r in rows if r["published"]]
    newest = published[-1] if published else None
    keep_set = set(published[-keep:]) | {live} | set(protected)
    doomed, kept = [], []
    for r in rows:
        name = r["version"]
        abandoned = not r["published"] and newest is not None and name < newest  # retired folders included
        if (r["published"] and name not in keep_set) or (abandoned and name not in protected):
            doomed.append(r)
        else:
            kept.append(name)
    referenced = referenced_paths(index, [r["version"] for r in rows if r["published"] and r["version"] in keep_set])
    deleted, retired = [], []
    for r in doomed:
        name = r["version"]
        if r["published"]:  # no longer a version from here on: a crash below leaves a folder the next run cleans
            index.write_json({"retired_at": time.time()}, "versions", name, RETIRED)
            index.delete("versions", name, MANIFEST)
        if _delete_unreferenced(index, name, referenced):
            retired.append(name)
        if not (r["retired"] and name in retired):  # a folder retired before and still needed is not news
            deleted.append(name)
    return {"deleted": deleted, "retired": retired, "kept": kept}


def referenced_paths(index: Location, versions: list[str]) -> set[str]:
    """Every file (path relative to the index root) the manifests of `versions` reference."""
    return {ref.path for name in versions for ref in read_manifest(index, name).files()}


def _delete_unreferenced(index: Location, version: str, referenced: set[str]) -> bool:
    """Delete the folder's files that `referenced` does not name; True when some remain (the folder is
    then retired: it holds only those files and its marker), False when the whole folder went."""
    folder = f"versions/{version}"
    files = [index.relative(p) if index.path() != "/" else p.lstrip("/") for p in index.find(folder)]
    keep = [f for f in files if f in referenced]
    if not keep:
        index.delete("versions", version)
        return False
    marker = f"{folder}/{RETIRED}"
    for path in files:
        if path not in referenced and path != marker:
            index.delete(path)
    if marker not in files:
        index.write_json({"retired_at": time.time()}, "versions", version, RETIRED)
    return True
