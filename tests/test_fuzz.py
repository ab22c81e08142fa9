"""Decode fuzzing: seeded mutations of real JPEG, PNG, WebP, GIF and TIFF bytes through the real decode path.

Every case must either decode or become a classified failure row: no exception may escape
`decode_batch` (the index job's decode stage) or `open_image` (the rerank stage, which
only catches DecodeFailure), and no process may die. The cases run in Ray tasks, one
worker process per chunk of cases, so a crash in a C decoder fails the chunk (named by its
case numbers) instead of killing pytest.

CI runs 2,000 cases with a fixed seed. More, or another seed:
    MLLM_INDEX_FUZZ_CASES=50000 MLLM_INDEX_FUZZ_SEED=7 python -m pytest -q -s tests/test_fuzz.py
A case is reproducible alone: `mutate(seeds(), seed, case)`.
"""

from __future__ import annotations

import io
import os
import re
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

import mllm_index.pipelines as pipelines
from mllm_index.actors.decode import ERROR_TYPES

CASES = int(os.environ.get("MLLM_INDEX_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("MLLM_INDEX_FUZZ_SEED", "20261127"))
CHUNK = 100  # cases per Ray task: a crash names at most this many suspects
# A smaller pixel limit than the default (89M) keeps each case cheap (a mutated header may
# ask for a huge canvas); the limit check itself is one of the things fuzzed. The time limit
# is far above what a legitimate case needs (milliseconds) and low enough not to stall CI.
LIMITS = dict(max_pixels=16_000_000, max_bytes=64 << 20, timeout_s=5.0)
DRAFT = 256  # the rerank stage decodes JPEGs in draft mode too


# ---- seeds: the bundled photos, re-encoded small -------------------------------------------

def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def seeds() -> list[tuple[str, str, bytes]]:
    """(name, format, bytes): six photos x eleven encodings, 56-96 px on the long side."""
    photos = sorted((Path(pipelines.__file__).parent / "data" / "photos").glob("*.jpg"))[::3]
    out = []
    for k, path in enumerate(photos):
        img = Image.open(path).convert("RGB")
        img.thumbnail((56 + 8 * k, 56 + 8 * k))
        rgba = img.copy()
        rgba.putalpha(Image.linear_gradient("L").resize(img.size))
        variants = {
            "jpeg": (img, "JPEG", dict(quality=85)),
            "jpeg-progressive": (img, "JPEG", dict(quality=85, progressive=True, subsampling=0)),
            "jpeg-gray": (img.convert("L"), "JPEG", dict(quality=70, progressive=k % 2 == 1)),
            "png": (img, "PNG", {}),
            "png-palette": (img.convert("P"), "PNG", dict(transparency=0)),
            "png-rgba": (rgba, "PNG", {}),
            "gif": (img.convert("P"), "GIF", {}),
            "webp": (img, "WEBP", dict(quality=80)),
            "webp-alpha": (rgba, "WEBP", dict(lossless=k % 2 == 0)),
            "tiff": (img, "TIFF", dict(compression="raw" if k % 2 else "packbits")),
            "tiff-lzw": (img, "TIFF", dict(compression="tiff_lzw")),
        }
        for name, (im, fmt, kw) in variants.items():
            out.append((f"{path.stem}.{name}", fmt.lower(), _encode(im, fmt, **kw)))
    return out


# ---- structure: where the length, size, count, offset and type fields are ------------------
# A field is (offset, width in bytes, byte order, kind); a chunk is a (start, end) span.

SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
NEXT_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xff]")  # not a stuffed 0xff00, not a restart marker


def _u(d, off: int, width: int, order: str) -> int:
    return int.from_bytes(bytes(d[off : off + width]), order)


def _png(d, fields: list, chunks: list) -> None:
    pos = 8
    while pos + 12 <= len(d):
        n, kind = _u(d, pos, 4, "big"), bytes(d[pos + 4 : pos + 8])
        fields += [(pos, 4, "big", "length"), (pos + 4, 4, "big", "type")]
        if kind == b"IHDR":
            fields += [(pos + 8, 4, "big", "size"), (pos + 12, 4, "big", "size")]
            fields += [(pos + 16 + k, 1, "big", "type") for k in range(5)]  # depth, colour type, methods, interlace
        if pos + 12 + n > len(d):
            return
        fields.append((pos + 8 + n, 4, "big", "crc"))
        chunks.append((pos, pos + 12 + n))
        pos += 12 + n


def _jpeg(d, fields: list, chunks: list) -> None:
    pos = 2
    while pos + 4 <= len(d) and d[pos] == 0xFF:
        m, n = d[pos + 1], _u(d, pos + 2, 2, "big")
        if m == 0xD9:
            chunks.append((pos, pos + 2))
            return
        fields += [(pos + 1, 1, "big", "type"), (pos + 2, 2, "big", "length")]
        if m in SOF:  # precision, height, width, components, then each component's sampling factors
            fields += [(pos + 4, 1, "big", "type"), (pos + 5, 2, "big", "size"), (pos + 7, 2, "big", "size"),
                       (pos + 9, 1, "big", "count")] + [(pos + 11 + 3 * c, 1, "big", "type") for c in range(d[pos + 9])]
        elif m == 0xDA:  # components in scan, then spectral selection and successive approximation
            fields += [(pos + 4, 1, "big", "count")] + [(pos + 2 + n - k, 1, "big", "type") for k in (1, 2, 3)]
        elif m == 0xDD:
            fields.append((pos + 4, 2, "big", "count"))  # restart interval
        end = pos + 2 + n
        if m == 0xDA:  # entropy-coded data runs to the next real marker
            found = NEXT_MARKER.search(bytes(d), end)
            end = found.start() if found else len(d)
        chunks.append((pos, min(end, len(d))))
        pos = end


def _gif(d, fields: list, chunks: list) -> None:
    fields += [(6, 2, "little", "size"), (8, 2, "little", "size"), (10, 1, "little", "type")]
    pos = 13 + (3 << ((d[10] & 7) + 1) if d[10] & 0x80 else 0)
    while pos < len(d):
        start = pos
        if d[pos] == 0x3B:
            chunks.append((pos, pos + 1))
            return
        if d[pos] == 0x2C:  # image descriptor: left, top, width, height, flags; local palette; LZW code size
            fields += [(pos + 1, 2, "little", "offset"), (pos + 3, 2, "little", "offset"), (pos + 5, 2, "little", "size"),
                       (pos + 7, 2, "little", "size"), (pos + 9, 1, "little", "type")]
            flags = d[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            fields.append((pos, 1, "little", "type"))
            pos += 1
        elif d[pos] == 0x21:
            pos += 2
        else:
            return
        while pos < len(d) and d[pos]:  # data sub-blocks, each led by its length
            fields.append((pos, 1, "little", "length"))
            pos += 1 + d[pos]
        chunks.append((start, min(pos + 1, len(d))))
        pos += 1


def _tiff(d, fields: list, chunks: list) -> None:
    order = "little" if d[:2] == b"II" else "big"
    fields += [(2, 2, order, "type"), (4, 4, order, "offset")]
    ifd = _u(d, 4, 4, order)
    n = _u(d, ifd, 2, order)
    fields.append((ifd, 2, order, "count"))
    for k in range(n):
        e = ifd + 2 + 12 * k
        if e + 12 > len(d):
            return
        tag, typ = _u(d, e, 2, order), _u(d, e + 2, 2, order)
        kind = "size" if tag in (256, 257) else "offset"  # width/length; most other values are offsets or counts
        fields += [(e, 2, order, "type"), (e + 2, 2, order, "type"), (e + 4, 4, order, "count"),
                   (e + 8, 2 if typ == 3 else 4, order, kind)]
        chunks.append((e, e + 12))
    fields.append((ifd + 2 + 12 * n, 4, order, "offset"))  # next IFD


def _webp(d, fields: list, chunks: list) -> None:
    fields.append((4, 4, "little", "length"))  # RIFF size
    pos = 12
    while pos + 8 <= len(d):
        tag, n = bytes(d[pos : pos + 4]), _u(d, pos + 4, 4, "little")
        fields += [(pos, 4, "little", "type"), (pos + 4, 4, "little", "length")]
        body = pos + 8
        if tag == b"VP8X":  # flags, canvas width - 1, height - 1 (24 bits each)
            fields += [(body, 1, "little", "type"), (body + 4, 3, "little", "size"), (body + 7, 3, "little", "size")]
        elif tag == b"VP8 ":  # 14-bit width and height after the frame tag and start code
            fields += [(body + 6, 2, "little", "size"), (body + 8, 2, "little", "size")]
        elif tag == b"VP8L":  # width - 1 and height - 1, 14 bits each, packed
            fields.append((body + 1, 4, "little", "size"))
        chunks.append((pos, min(body + n + (n & 1), len(d))))
        pos = body + n + (n & 1)


PARSERS = {"jpeg": _jpeg, "png": _png, "gif": _gif, "tiff": _tiff, "webp": _webp}


def layout(fmt: str, d) -> tuple[list, list]:
    """Fields and chunks of (possibly already mutated) bytes, as far as they parse."""
    fields, chunks = [], []
    try:
        PARSERS[fmt](d, fields, chunks)
    except IndexError:
        pass
    return [f for f in fields if f[0] + f[1] <= len(d)], [c for c in chunks if c[1] <= len(d)]


# ---- mutations -----------------------------------------------------------------------------

def _pos(d, rng) -> int:
    """A byte position, half the time in the first 256 bytes where the headers are."""
    return int(rng.integers(min(len(d), 256) if rng.random() < 0.5 else len(d)))


def bit_flips(d, fmt, rng, pool) -> None:
    for _ in range(rng.integers(1, 9)):
        d[_pos(d, rng)] ^= 1 << int(rng.integers(8))


def byte_edits(d, fmt, rng, pool) -> None:
    for _ in range(rng.integers(1, 5)):
        d[_pos(d, rng)] = int(rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, int(rng.integers(256))]))


def truncation(d, fmt, rng, pool) -> None:
    _, chunks = layout(fmt, d)
    if chunks and rng.random() < 0.5:  # at a chunk boundary, give or take a few bytes
        cut = chunks[rng.integers(len(chunks))][int(rng.integers(2))] + int(rng.integers(-4, 5))
    else:
        cut = int(rng.integers(len(d)))
    del d[max(cut, 0) :]


def _set_field(d, fmt: str, rng, kinds: tuple, huge: bool) -> None:
    fields = [f for f in layout(fmt, d)[0] if f[3] in kinds]
    if not fields:
        return bit_flips(d, fmt, rng, None)
    off, width, order, _ = fields[rng.integers(len(fields))]
    top, orig = (1 << 8 * width) - 1, _u(d, off, width, order)
    if huge:
        value = int(rng.choice([top, top - 1, top >> 1, (top >> 1) + 1, top - 16]))
    else:
        value = int(rng.choice([0, 1, 2, orig + 1, orig - 1, orig * 2, orig * 16, orig >> 1, top, int(rng.integers(top + 1))]))
    d[off : off + width] = (value % (top + 1)).to_bytes(width, order)


def field_edit(d, fmt, rng, pool) -> None:
    """A header field (length, size, count, offset, type or CRC) set to an edge value."""
    _set_field(d, fmt, rng, ("length", "size", "count", "offset", "type", "crc"), huge=False)


def huge_field(d, fmt, rng, pool) -> None:
    """A length, size, count or offset field set to (nearly) the largest value it can hold."""
    _set_field(d, fmt, rng, ("length", "size", "count", "offset"), huge=True)


def chunk_edit(d, fmt, rng, pool) -> None:
    """A chunk, segment, block or IFD entry deleted, duplicated, repeated or swapped with the next."""
    _, chunks = layout(fmt, d)
    if not chunks:
        return truncation(d, fmt, rng, pool)
    k = int(rng.integers(len(chunks)))
    a, b = chunks[k]
    piece, action = bytes(d[a:b]), rng.integers(4)
    if action == 0:
        del d[a:b]
    elif action == 1:
        d[b:b] = piece
    elif action == 2:
        d[b:b] = piece * int(rng.integers(2, 9))
    elif k + 1 < len(chunks) and chunks[k + 1][0] == b:
        c = chunks[k + 1][1]
        d[a:c] = d[b:c] + piece


def insertion(d, fmt, rng, pool) -> None:
    junk = rng.integers(0, 256, int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    at = len(d) if rng.random() < 0.3 else _pos(d, rng)
    d[at:at] = junk


def splice(d, fmt, rng, pool) -> None:
    """The tail replaced by the tail of another seed (same format half the time)."""
    same = [s for s in pool if s[1] == fmt] if rng.random() < 0.5 else pool
    other = same[rng.integers(len(same))][2]
    d[_pos(d, rng) :] = other[int(rng.integers(len(other))) :]


MUTATIONS = (bit_flips, byte_edits, truncation, field_edit, huge_field, chunk_edit, insertion, splice)


def fix_png_crcs(d) -> None:
    """Recompute every chunk CRC, so the edit gets past PIL's CRC check into the decoder."""
    for a, b in layout("png", d)[1]:
        d[b - 4 : b] = (zlib.crc32(bytes(d[a + 4 : b - 4])) & 0xFFFFFFFF).to_bytes(4, "big")


def mutate(pool: list, seed: int, case: int) -> tuple[str, bytes, list[str]]:
    """(seed name, mutated bytes, mutation names) of one case; the same for the same (seed, case)."""
    rng = np.random.default_rng([seed, case])
    name, fmt, data = pool[rng.integers(len(pool))]
    d, ops = bytearray(data), []
    for _ in range(rng.integers(1, 4)):
        if not d:
            break
        op = MUTATIONS[rng.integers(len(MUTATIONS))]
        op(d, fmt, rng, pool)
        ops.append(op.__name__)
    if fmt == "png" and rng.random() < 0.5:
        fix_png_crcs(d)
        ops.append("fix_png_crcs")
    return name, bytes(d), ops


# ---- running the cases in Ray tasks --------------------------------------------------------

def _runner(ray):
    """A Ray task running a chunk of cases through decode_batch and open_image. Nested, with its own
    imports, so that Ray ships it by value: a Ray worker cannot import this test module."""

    @ray.remote(max_retries=0, num_cpus=1)
    def run_chunk(blob: str, offsets: list, lengths: list, limits: dict, draft: int) -> tuple[list, list]:
        import numpy as np

        from mllm_index.actors.decode import DecodeFailure, decode_batch, open_image

        n = len(offsets)
        batch = {"image_id": np.arange(n), "key": np.array([f"case-{i}" for i in range(n)], object),
                 "uri": np.array([blob] * n, object), "kind": np.array(["file"] * n, object),
                 "offset": np.array(offsets, np.int64), "length": np.array(lengths, np.int64)}
        out = decode_batch(batch, image_size=64, fill=(124, 116, 104), storage_options={}, **limits)
        rows = [(bool(out["ok"][i]), out["stage"][i], out["error_type"][i]) for i in range(n)]
        data, opened = open(blob, "rb").read(), []
        for o, ln in zip(offsets, lengths):
            try:
                img, w, h = open_image(data[o : o + ln], limits["max_pixels"], limits["max_bytes"], draft_long_side=draft,
                                       timeout_s=limits["timeout_s"])
                opened.append("ok" if img.mode == "RGB" and w > 0 and h > 0 else f"escaped: mode {img.mode} {w}x{h}")
            except DecodeFailure as exc:
                opened.append(exc.error_type)
            except Exception as exc:  # what the rerank stage would not catch
                opened.append(f"escaped: {type(exc).__name__}: {exc}"[:200])
        return rows, opened

    return run_chunk


def run_cases(ray, task, cases: list[bytes], folder: Path) -> tuple[list, list, list[str]]:
    """(decode_batch rows, open_image outcomes, chunks whose task failed), in case order."""
    folder.mkdir()
    pending = []
    for start in range(0, len(cases), CHUNK):
        chunk = cases[start : start + CHUNK]
        blob = folder / f"cases-{start:07d}.bin"
        blob.write_bytes(b"".join(chunk))
        offsets = np.cumsum([0] + [len(c) for c in chunk[:-1]]).tolist()
        pending.append((start, len(chunk), task.remote(str(blob), offsets, [len(c) for c in chunk], LIMITS, DRAFT)))
    rows, opened, dead = [], [], []
    for start, n, ref in pending:
        try:
            r, o = ray.get(ref)
        except ray.exceptions.RayError as exc:  # a worker that died (or a task that raised) is named, not fatal
            dead.append(f"cases {start}..{start + n - 1}: {type(exc).__name__}: {str(exc)[:300]}")
            r, o = [None] * n, [None] * n
        rows += r
        opened += o
    return rows, opened, dead


def test_fuzzed_images_decode_or_become_classified_failures(ray_session, tmp_path, capsys):
    started = time.perf_counter()
    pool = seeds()
    cases = [mutate(pool, SEED, i) for i in range(CASES)]
    task = _runner(ray_session)
    rows, opened, dead = run_cases(ray_session, task, [data for _, _, data in pool], tmp_path / "seeds")
    assert not dead and all(ok for ok, *_ in rows) and opened == ["ok"] * len(pool)  # unmutated, all decode
    rows, opened, dead = run_cases(ray_session, task, [data for _, data, _ in cases], tmp_path / "cases")
    assert not dead, f"worker processes died (seed {SEED}, reproduce with `mutate`):\n" + "\n".join(dead)

    assert len(rows) == len(opened) == CASES
    decoded = sum(ok for ok, *_ in rows)
    failed = [(i, stage, error_type) for i, (ok, stage, error_type) in enumerate(rows) if not ok]
    assert decoded + len(failed) == CASES
    odd = [(i, cases[i][0], cases[i][2], s, e) for i, s, e in failed if s != "decode" or e not in ERROR_TYPES]
    assert not odd, f"failures outside the decode taxonomy: {odd[:10]}"
    escaped = [(i, cases[i][0], cases[i][2], o) for i, o in enumerate(opened) if o != "ok" and o not in ERROR_TYPES]
    assert not escaped, f"open_image let these escape (seed {SEED}): {escaped[:10]}"
    assert 0 < decoded < CASES  # a mutator that breaks nothing, or everything, tests nothing

    by_type, by_open = Counter(e for _, _, e in failed), Counter(o for o in opened if o != "ok")
    formats = Counter((cases[i][0].split(".")[1], ok) for i, (ok, *_) in enumerate(rows))
    with capsys.disabled():
        print(f"\nfuzz: seed {SEED}, {CASES} cases, {time.perf_counter() - started:.1f} s")
        print(f"decode_batch: decoded {decoded} + failed {len(failed)} = {CASES};"
              f" open_image: ok {opened.count('ok')} + failed {sum(by_open.values())}")
        print(f"{'error_type':<20}{'decode_batch':>14}{'open_image':>12}")
        for error_type in sorted(set(by_type) | set(by_open), key=lambda e: -by_type[e]):
            print(f"{error_type:<20}{by_type[error_type]:>14}{by_open[error_type]:>12}")
        print("decoded/cases by seed encoding: " + ", ".join(
            f"{f} {formats[f, True]}/{formats[f, True] + formats[f, False]}" for f in sorted({f for f, _ in formats})))


def test_a_dead_worker_is_reported_with_its_cases(ray_session, tmp_path):
    """The harness itself: a task whose process dies shows up as named cases, the rest still run."""
    import ray

    @ray.remote(max_retries=0, num_cpus=1)
    def dies_on_case_zero(blob, offsets, lengths, limits, draft):
        import os

        if offsets[0] == 0 and lengths[0] == 1:
            os._exit(1)
        return [(True, "", "")] * len(offsets), ["ok"] * len(offsets)

    rows, opened, dead = run_cases(ray, dies_on_case_zero, [b"x"] + [b"yy"] * (CHUNK + 5), tmp_path / "cases")
    assert len(dead) == 1 and dead[0].startswith(f"cases 0..{CHUNK - 1}:") and "WorkerCrashedError" in dead[0]
    assert rows[:CHUNK] == [None] * CHUNK and all(rows[CHUNK:]) and opened[CHUNK:] == ["ok"] * 6
