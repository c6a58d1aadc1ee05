"""``copyscan nightly`` / ``python -m copyscan.jobs.nightly``: scan one checkpoint's generations and gate on
the trend.

With ``--generate KEY=VALUE ...``, ``--checkpoint`` is a diffusers checkpoint folder and the night starts by
generating from it (``copyscan generate``'s keys: ``prompts=FILE``, ``captions=N`` from ``--index``, ...)
into ``HISTORY/generations/CHECKPOINT``, with a memorisation score per prompt; the generations are then
scanned as below, their memorised prompts found (``copyscan memorized``) into
``HISTORY/memorized/CHECKPOINT`` and shown in the report, and the regression report compares the score
distribution with the previous checkpoint and the baseline (prompt by prompt: same prompts, same seeds).
Otherwise ``--generations`` names images made elsewhere.

Scans the generations into
``HISTORY/runs/CHECKPOINT``, appends the checkpoint's row to ``HISTORY/history/``, compares its replication
rate with the previous checkpoint and the pinned ``--baseline``, and writes
``HISTORY/regression/CHECKPOINT.json`` (see ``search/report/history.py``) and the checkpoint's report with the trend
across checkpoints, ``HISTORY/reports/CHECKPOINT/report.html`` (``copyscan report``). Exit status: 0 when the rate did not rise
significantly, 3 when it did, 2 on errors. Rerunning a night resumes its scan.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from copyscan.indexing.errors import CopyscanError
from copyscan.jobs._runtime import Job, layers

REGRESSION_EXIT = 3


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="name of the model checkpoint (e.g. sd-v1-4-ema); with --generate, its diffusers folder (URL)",
    )
    parser.add_argument("--generations", help="its generated images: folder or webdataset shards")
    parser.add_argument(
        "--generate",
        nargs="+",
        action="extend",
        metavar="KEY=VALUE",
        help="generate from --checkpoint first, with these copyscan generate keys (e.g. prompts=p.txt); "
        "give the scan's key=value before it",
    )
    parser.add_argument(
        "--name", help="with --generate: the checkpoint's name in the history (default: folder name)"
    )
    parser.add_argument("--index", required=True, help="URL of the training set's copyscan index")
    parser.add_argument("--history", required=True, help="URL of the history (runs, history rows, reports)")
    parser.add_argument("--baseline", help="pinned checkpoint to compare with as well as the previous one")
    parser.add_argument("--alpha", type=float, default=0.01, help="significance of a rise (default 0.01)")
    parser.add_argument(
        "--no-report", action="store_true", help="skip HISTORY/reports/CHECKPOINT (the HTML report)"
    )


def _body(args: argparse.Namespace) -> int:
    """Scan, gate, report; REGRESSION_EXIT when the replication rate rose significantly, else 0."""
    from copyscan.indexing.runtime.config import resolve
    from copyscan.indexing.store import layout, storage
    from copyscan.search.scan_config import ScanConfig

    if (args.generate is None) == (args.generations is None):
        raise CopyscanError(
            "give --generations (images made elsewhere) or --generate KEY=VALUE ..., not both"
        )
    if args.generate is not None:
        args.checkpoint_url = args.checkpoint
        args.checkpoint = args.name or args.checkpoint.rstrip("/").rsplit("/", 1)[-1]
        generated = layout.history_generations_dir(args.history, layout.checkpoint_name(args.checkpoint))
        args.generations = layout.generate_shards_dir(generated)
    scan_out = layout.history_run_dir(args.history, args.checkpoint)
    explicit = {"index": args.index, "queries": args.generations, "out": scan_out}
    cfg = resolve(ScanConfig, *layers(args, explicit))
    if args.generate is not None:
        _generate(args, cfg)
    regression = _scan_and_compare(args, cfg, scan_out)
    if args.generate is not None:
        regression["memorization_score"] = _compare_scores(args, cfg, regression)
        storage.write_json(
            layout.regression_url(args.history, args.checkpoint), regression, cfg.storage_options
        )
    print(json.dumps(regression, indent=2))
    if not args.no_report:
        _write_report(args, cfg, scan_out)
    if regression["regression"]:
        print(
            f"copyscan: the replication rate of {args.checkpoint} rose significantly (exit {REGRESSION_EXIT})",
            file=sys.stderr,
        )
        return REGRESSION_EXIT
    return 0


def _generate(args: argparse.Namespace, cfg: Any) -> None:
    """Generate from the checkpoint into the history (the scan's queries), then find its memorised
    prompts."""
    from copyscan.indexing.runtime.config import parse_overrides, resolve
    from copyscan.indexing.store import layout
    from copyscan.search.generate.config import GenerateConfig
    from copyscan.search.generate.generate_ray import run_generate
    from copyscan.search.memorized.config import MemorizedConfig
    from copyscan.search.memorized.memorized_ray import run_memorized

    so = dict(cfg.storage_options)
    given = parse_overrides(args.generate)
    defaults = {
        "checkpoint": args.checkpoint_url,
        "out": layout.history_generations_dir(args.history, args.checkpoint),
    }
    if "captions" in given and "captions_from" not in given:
        defaults["captions_from"] = args.index  # captions of the training set the scan searches
    gcfg = resolve(GenerateConfig, {**defaults, "storage_options": so}, given)
    run_generate(gcfg)
    memorized = resolve(
        MemorizedConfig,
        {
            "generations": args.generations,
            "out": layout.history_memorized_dir(args.history, args.checkpoint),
            "storage_options": so,
        },
    )
    run_memorized(memorized)


def _compare_scores(args: argparse.Namespace, cfg: Any, regression: dict[str, Any]) -> dict[str, Any]:
    """This checkpoint's memorisation-score distribution, and against the previous checkpoint and the
    baseline where they were generated too."""
    from copyscan.indexing.store import layout
    from copyscan.search.generate.scores import (
        compare_scores,
        read_prompt_scores,
        score_distribution,
        top_prompts,
    )

    so = cfg.storage_options
    this = read_prompt_scores(layout.history_generations_dir(args.history, args.checkpoint), so)
    result: dict[str, Any] = {"distribution": score_distribution(this["score"].to_pylist())}
    result["top_prompts"] = top_prompts(this, _rank0_matches(cfg), _memorized(args, so))
    for name in ("vs_previous", "vs_baseline"):
        other = (regression.get(name) or {}).get("checkpoint")
        scores = (
            read_prompt_scores(layout.history_generations_dir(args.history, other), so) if other else None
        )
        result[name] = compare_scores(this, scores, other) if scores is not None else None
    return result


def _rank0_matches(cfg: Any) -> Any:
    """The scan's best match of every generation."""
    import pyarrow.compute as pc

    from copyscan.search.results.dataset import open_matches

    return open_matches(cfg.out, cfg.storage_options).to_table(filter=pc.field("rank") == 0)


def _memorized(args: argparse.Namespace, so: Any) -> Any:
    """The night's ``copyscan memorized`` result."""
    import io

    import pyarrow.parquet as pq

    from copyscan.indexing.store import layout, storage

    url = storage.join(
        layout.history_memorized_dir(args.history, args.checkpoint), layout.MEMORIZED_RESULT_NAME
    )
    return pq.read_table(io.BytesIO(storage.read_bytes(url, so)))


def _scan_and_compare(args: argparse.Namespace, cfg: Any, scan_out: str) -> dict[str, Any]:
    """Scan the checkpoint's generations, append its history row and write its regression report."""
    from copyscan.indexing.store import layout, storage
    from copyscan.search.report import history
    from copyscan.search.scan_ray import run_scan

    so = cfg.storage_options
    summary = run_scan(cfg)
    row = history.history_row(args.checkpoint, args.generations, scan_out, summary, so)
    history.write_row(args.history, row, so)
    report = history.regression_report(row, history.read_history(args.history, so), args.baseline, args.alpha)
    storage.write_json(layout.regression_url(args.history, args.checkpoint), report, so)
    return report


def _write_report(args: argparse.Namespace, cfg: Any, scan_out: str) -> None:
    """The checkpoint's HTML report with the trend across checkpoints (``copyscan report``)."""
    from copyscan.indexing.store import layout
    from copyscan.search.report.config import ReportConfig
    from copyscan.search.report.run import run_report

    report_out = layout.history_report_dir(args.history, args.checkpoint)
    memorized = layout.history_memorized_dir(args.history, args.checkpoint) if args.generate else ""
    run_report(
        ReportConfig(
            run=scan_out,
            out=report_out,
            history=args.history,
            memorized=memorized,
            generations=layout.history_generations_dir(args.history, args.checkpoint)
            if args.generate
            else "",
            cache_dir=cfg.cache_dir,
            storage_options=dict(cfg.storage_options),
        )
    )
    print(f"report: {report_out}/report.html")


JOB = Job(
    name="nightly",
    summary="scan a checkpoint's generations (or generate them), append to the history, exit 3 on a significant rise",
    description=__doc__,
    arguments=_arguments,
    body=_body,
    config="copyscan.search.scan_config:ScanConfig",
)

if __name__ == "__main__":
    sys.exit(JOB.main())
