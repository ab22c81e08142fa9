"""`mllm-index` command line: one sub-command per job. Exit 0 on success, non-zero on failure."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from mllm_index.pipelines.cluster import init_ray
from mllm_index.configs.schema import ConfigError, IndexJobConfig, RerankJobConfig, UpdateOptions, load_config
from mllm_index.storage.uris import Location, StorageError, find_credential_options, redact_text

EXIT_FAILED, EXIT_CONFIG = 1, 2


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML job config (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set embed.batch_size=128 (repeatable; value parsed as YAML)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of text")


def _add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage-option", dest="storage_options", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000 (credentials come from the environment)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def _storage_options(pairs: list[str]) -> dict:
    options = dict(p.split("=", 1) for p in pairs if "=" in p)
    bad = find_credential_options(options)
    if bad or len(options) != len(pairs):
        raise ConfigError(f"--storage-option: expected KEY=VALUE without credentials (got {', '.join(bad) or pairs})")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mllm-index", description="Instance-level image retrieval on Ray: "
                                     "index galleries into versioned IVF-PQ FAISS indexes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="build a new index version from a gallery source",
                       description="Stream a gallery (loose images, WebDataset tar shards or Parquet) through "
                       "decode and embedding actors into a new version of a sharded IVF-PQ index. Re-running an "
                       "interrupted job resumes it.")
    p.add_argument("source", nargs="?", help="gallery URI (local path, s3://, memory://); or source.uri in --config")
    p.add_argument("index", nargs="?", help="index root URI; or index.uri in --config")
    p.add_argument("--model", help="vision backbone: Hugging Face id or local path (e.g. facebook/dinov2-small)")
    _add_config_args(p)

    p = sub.add_parser("rerank", help="re-rank the kNN top-k of a query set with an MLLM",
                       description="Embed a query set with the index's backbone, take the kNN top-k from an index "
                       "version, score each (query, candidate) pair with a multimodal LLM (P(yes) of the next token) "
                       "and write Parquet result tables. Re-running resumes unfinished parts.")
    p.add_argument("queries", nargs="?", help="query set URI: images, WebDataset shards or Parquet; or queries.uri")
    p.add_argument("index", nargs="?", help="index root URI (its LATEST version unless index_version is set)")
    p.add_argument("output", nargs="?", help="output URI for this run's result tables")
    p.add_argument("--model", help="re-ranking MLLM: HF id or local path (omit for the kNN order only)")
    p.add_argument("--top-k", type=int, help="candidates per query (search.top_k)")
    p.add_argument("--depth", type=int, help="how many of them the MLLM re-scores (reranker.depth)")
    _add_config_args(p)

    p = sub.add_parser("evaluate", help="mAP / mAP@k / recall / precision of a rerank run, kNN vs re-ranked",
                       description="Score a rerank run's results against a ground-truth table (Parquet or JSON "
                       "lines: query_id, positives, junk, optional conditions). Prints one table with the kNN and "
                       "the re-ranked ranking side by side, per condition, and writes evaluation.json next to the results.")
    p.add_argument("results", help="the rerank run's OUTPUT_URI")
    p.add_argument("ground_truth", help="ground-truth table URI (.parquet, or .jsonl)")
    p.add_argument("--k", default="1,5,10,100", help="cut-offs for mAP@k, R@k, P@k (default: %(default)s)")
    _add_storage_args(p)

    p = sub.add_parser("import-gt", help="convert Revisited Oxford/Paris or ILIAS ground truth to Parquet",
                       description="One-time conversion of a benchmark's ground truth to mllm-index tables. "
                       "Revisited Oxford/Paris ship a Python pickle: it is loaded only here, from a local file you "
                       "name, because unpickling can run code; everything after reads the Parquet written here.")
    p.add_argument("format", choices=["revisitop", "ilias"])
    p.add_argument("source", help="revisitop: local gnd_*.pkl file; ilias: dataset folder with image_ids/")
    p.add_argument("output", help="folder URI for gt_*.parquet (and queries.parquet)")
    p.add_argument("--key-format", help="gallery key for a dataset name (revisitop default '{}.jpg', ilias '{}')")
    p.add_argument("--images-uri", help="revisitop: folder of the jpg files; writes queries.parquet (key, uri, bbox)")
    _add_storage_args(p)

    p = sub.add_parser("report", help="self-contained HTML report of a rerank run",
                       description="Write report.html next to a rerank run's results: the metrics table (from "
                       "evaluation.json) and, for a sample of queries, the query with its top-k before and after "
                       "re-ranking as thumbnails, with scores and correct / junk / wrong marks given ground truth.")
    p.add_argument("results", help="the rerank run's OUTPUT_URI")
    p.add_argument("--ground-truth", help="ground-truth table URI, for the correct / junk / wrong marks")
    p.add_argument("--queries", type=int, default=12, help="how many queries to show (default: %(default)s)")
    p.add_argument("--top", type=int, default=8, help="results shown per ranking (default: %(default)s)")
    _add_storage_args(p)

    p = sub.add_parser("update", help="nightly update: embed only what changed, publish a new version",
                       description="Diff the source against the live version's key index (added, changed by etag or size, "
                       "deleted; tar / Parquet containers whose etag and size are unchanged are not opened), embed only "
                       "added and changed images with the live model into delta shard(s) on the live trained index, "
                       "tombstone deleted and changed ids, and publish a new version that references the live version's "
                       "untouched files instead of copying them. Shards whose tombstones pass index.compact_fraction are "
                       "rebuilt without them (all of them with --compact); every shard is rebuilt on a new training when "
                       "the gallery grew past --retrain-factor, or with --retrain. A run with nothing to change publishes nothing.")
    p.add_argument("source", nargs="?", help="gallery URI; or source.uri in --config")
    p.add_argument("index", nargs="?", help="index root URI; or index.uri in --config")
    p.add_argument("--retrain", action="store_true", help="retrain the IVF-PQ index on the updated gallery")
    p.add_argument("--retrain-factor", type=float, default=2.0,
                   help="retrain when the gallery is this many times larger than at the last training (default: %(default)s)")
    p.add_argument("--compact", action="store_true",
                   help="rebuild every shard that has tombstones without them, and merge small delta shards")
    _add_config_args(p)

    p = sub.add_parser("versions", help="list an index's versions", description="List the version folders of an "
                       "index: published or in progress, which one is live (LATEST), counts, model and dates.")
    p.add_argument("index", help="index root URI")
    _add_storage_args(p)

    p = sub.add_parser("rollback", help="make an earlier published version the live one",
                       description="Point LATEST at an earlier published version (taking the index lock, so it cannot "
                       "race a publish). Readers see it the next time they open the index.")
    p.add_argument("index", help="index root URI")
    p.add_argument("version", help="a published version, e.g. v000003")
    _add_storage_args(p)

    p = sub.add_parser("verify", help="check every file of an index version and that its counts reconcile",
                       description="Read every file a version's manifest references, check its size and sha256 (versions "
                       "written before checksums: size and structure), parse it (FAISS indexes, Parquet parts, codebooks), "
                       "and check that the counts reconcile (vectors in the shards = embeddings rows = catalog rows = "
                       "indexed; failure rows = failed; seen = indexed + failed + skipped). Exit 0 if everything verifies, "
                       "1 otherwise.")
    p.add_argument("index", help="index root URI")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="the version to verify (default: the live one)")
    which.add_argument("--all", action="store_true", help="verify every published version")
    _add_storage_args(p)

    p = sub.add_parser("gc", help="delete old index versions (never the live one or a leased one)",
                       description="Delete published versions beyond the newest --keep, except the live version and any "
                       "version a running reader (a rerank job) holds a lease on, and abandoned unpublished folders older "
                       "than the newest published version. Files that a kept version still references (versions share "
                       "files) stay: such a folder is shown as retired until no kept version needs them. Takes the index "
                       "lock, so no writer is working meanwhile.")
    p.add_argument("index", help="index root URI")
    p.add_argument("--keep", type=int, required=True, help="how many of the newest published versions to keep")
    _add_storage_args(p)

    p = sub.add_parser("demo", help="index -> rerank -> evaluate -> report on a set made from the bundled photos, offline",
                       description="Offline quick start: builds an instance-retrieval set from the photos shipped with "
                       "the package (positives under viewpoint/scale change, occlusion, small objects in clutter and "
                       "strong photometric change; hard negatives from the same photos), then runs the index job "
                       "(SIFT-VLAD), the rerank job (SIFT + RANSAC spatial verification) and the evaluation on a local "
                       "Ray, and writes an HTML report.")
    p.add_argument("--workdir", default="mllm-index-demo", help="where the data, index and runs go (default: %(default)s)")
    p.add_argument("--model", help="embedding backbone instead of classic:sift-vlad (HF id or local path)")
    p.add_argument("--reranker-model", help="re-ranker instead of classic:sift-ransac (an MLLM: HF id or local path)")
    p.add_argument("--top-k", type=int, default=20, help="candidates per query, all re-ranked (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    return parser


def _print_summary(summary, as_json: bool, text) -> None:
    print(json.dumps(summary.to_json(), indent=2) if as_json else text(summary))


def format_versions(rows: list[dict]) -> str:
    def when(t):
        return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else "-"

    lines = [f"{'version':9s} {'state':12s} {'indexed':>9s} {'published (UTC)':17s} {'parent':9s} model / factory"]
    for r in rows:
        state = ("live" if r["live"] else "published" if r["published"] else "retired" if r.get("retired")
                 else "in progress")
        lines.append(f"{r['version']:9s} {state:12s} {r['indexed'] if r['indexed'] is not None else '-':>9} "
                     f"{when(r['published_at']):17s} {r['parent'] or '-':9s} {r['model'] or '-'} / {r['factory'] or '-'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # CPU-feature probing, not news
    try:
        if args.command == "index":
            from mllm_index.pipelines.index import run_index
            from mllm_index.pipelines.summaries import format_index

            cfg = load_config(IndexJobConfig, args.config, {"source.uri": args.source, "index.uri": args.index,
                                                            "model.name": args.model}, args.overrides).require()
            init_ray(cfg.run.ray_address, cfg.run.connect_timeout_s)
            _print_summary(run_index(cfg), args.json, format_index)
        elif args.command == "rerank":
            from mllm_index.pipelines.rerank import run_rerank
            from mllm_index.pipelines.summaries import format_rerank

            cfg = load_config(RerankJobConfig, args.config, {"queries.uri": args.queries, "index_uri": args.index,
                                                             "output_uri": args.output, "reranker.model": args.model,
                                                             "search.top_k": args.top_k, "reranker.depth": args.depth},
                              args.overrides).require()
            init_ray(cfg.run.ray_address, cfg.run.connect_timeout_s)
            _print_summary(run_rerank(cfg), args.json, format_rerank)
        elif args.command == "evaluate":
            from mllm_index.pipelines.evaluate import evaluate, format_report

            ks = tuple(int(k) for k in args.k.split(",") if k.strip())
            report = evaluate(args.results, args.ground_truth, ks, _storage_options(args.storage_options))
            print(json.dumps(report, indent=2) if args.json else format_report(report))
        elif args.command == "import-gt":
            from mllm_index.storage.ground_truth import import_ilias, import_revisitop

            options = _storage_options(args.storage_options)
            if args.format == "revisitop":
                written = import_revisitop(args.source, args.output, args.key_format or "{}.jpg", args.images_uri, options)
            else:
                written = import_ilias(args.source, args.output, args.key_format or "{}", options)
            print("\n".join(written))
        elif args.command == "report":
            from mllm_index.pipelines.report import write_report

            print(write_report(args.results, args.ground_truth, args.queries, args.top, _storage_options(args.storage_options)))
        elif args.command == "update":
            from mllm_index.pipelines.summaries import format_update
            from mllm_index.pipelines.update import run_update

            cfg = load_config(IndexJobConfig, args.config, {"source.uri": args.source, "index.uri": args.index}, args.overrides)
            options = load_config(UpdateOptions, None, {"retrain": args.retrain, "retrain_factor": args.retrain_factor,
                                                        "compact": args.compact})
            init_ray(cfg.run.ray_address, cfg.run.connect_timeout_s)
            _print_summary(run_update(cfg, options), args.json, format_update)
        elif args.command == "versions":
            from mllm_index.storage.versions import version_table

            rows = version_table(Location(args.index, _storage_options(args.storage_options)))
            print(json.dumps(rows, indent=2) if args.json else format_versions(rows))
        elif args.command == "rollback":
            from mllm_index.storage.lock import IndexLock
            from mllm_index.storage.versions import rollback

            index = Location(args.index, _storage_options(args.storage_options))
            with IndexLock(index, "mllm-index rollback", ttl_seconds=300):
                rollback(index, args.version)
            print(f"LATEST -> {args.version}")
        elif args.command == "gc":
            from mllm_index.storage.lock import IndexLock, leased_versions
            from mllm_index.storage.versions import collect_garbage

            index = Location(args.index, _storage_options(args.storage_options))
            with IndexLock(index, "mllm-index gc", ttl_seconds=600):
                result = collect_garbage(index, args.keep, leased_versions(index))
            retired = f"; retired (files still referenced): {', '.join(result['retired'])}" if result["retired"] else ""
            print(json.dumps(result) if args.json else f"deleted: {', '.join(result['deleted']) or 'nothing'}; "
                                                        f"kept: {', '.join(result['kept'])}{retired}")
        elif args.command == "verify":
            from mllm_index.storage.verify import format_checks, verify_version, versions_to_verify

            index = Location(args.index, _storage_options(args.storage_options))
            checks = [verify_version(index, v) for v in versions_to_verify(index, args.version, args.all)]
            print(json.dumps([vars(c) for c in checks], indent=2) if args.json else format_checks(index, checks))
            return 0 if all(c.ok for c in checks) else EXIT_FAILED
        elif args.command == "demo":
            from mllm_index.pipelines.demo import run_demo

            summary = run_demo(args.workdir, args.model, args.reranker_model, args.top_k)
            if args.json:
                print(json.dumps(summary, indent=2, default=str))
        return 0
    except ConfigError as exc:
        print(f"mllm-index {args.command}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (StorageError, FileNotFoundError, PermissionError, RuntimeError, OSError, ValueError) as exc:
        print(f"mllm-index {args.command}: error: {redact_text(str(exc))}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
