"""The memorised-prompt job on Ray: list generations by prompt, one task per batch of prompts, rank.

Listing webdataset shards (reading their prompts) is one Ray task per shard; the resulting plan
(prompt, source, key, task) is written once to ``OUT/plan.parquet`` and reused on resume. Each task then
fetches its prompts' generations together (one read per tar), builds each prompt's graph and clique, and
writes its part and then its marker; finished tasks are skipped on resume, failed ones retried and listed.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.read.shardlist import expand_queries
from copyscan.indexing.runtime import cluster_ray
from copyscan.indexing.runtime.config import to_dict
from copyscan.indexing.runtime.pool_ray import Size, run_tasks
from copyscan.indexing.runtime.progress import Progress
from copyscan.indexing.store import layout, storage
from copyscan.indexing.store.lease import Lease
from copyscan.indexing.store.outputs import claim_output, output_lease
from copyscan.search.memorized.config import MemorizedConfig
from copyscan.search.memorized.discover import (
    GraphSpec,
    assign_tasks,
    find_manifest,
    finished_tasks,
    list_shard,
    merge_parts,
    read_manifest,
    run_task,
)

logger = logging.getLogger("copyscan")


def _max_in_flight(cfg: MemorizedConfig) -> Size:
    """Tasks at once: ``max_in_flight``, or two per ``task_cpus`` of the CPUs alive (re-read as nodes join)."""
    if cfg.max_in_flight:
        return cfg.max_in_flight
    return lambda: max(1, int(2 * cluster_ray.alive()[0] / cfg.task_cpus))


def plan(cfg: MemorizedConfig) -> tuple[pa.Table, dict[str, Any]]:
    """(prompt, source, key, task) of every generation, and listing counts; read back when it exists."""
    so = cfg.storage_options
    url = storage.join(cfg.out, layout.MEMORIZED_PLAN_NAME)
    if storage.exists(url, so):
        table = pq.read_table(pa.BufferReader(storage.read_bytes(url, so)))
        return table, _counts(table)
    manifest = find_manifest(cfg.generations, so)
    no_prompt: list[dict[str, str]] = []
    if manifest is not None:
        listing = read_manifest(manifest, so)
        shards = 0
    else:
        kind, urls = expand_queries(cfg.generations, so)
        if kind != "shards":
            raise CopyscanError(
                f"{cfg.generations} is a folder of images without a manifest: add manifest.parquet, "
                f".jsonl or .csv with columns path and prompt, or give webdataset shards"
            )
        shards = len(urls)
        remote = ray.remote(list_shard).options(num_cpus=cfg.task_cpus)
        outcome = run_tasks(
            lambda u: remote.remote(u, so),
            urls,
            max_in_flight=_max_in_flight(cfg),
            retries=cfg.retries,
            describe=lambda u: f"listing {u}",
        )
        if outcome.failed:
            listing_errors = "\n".join(f"  {u}: {err}" for u, err in outcome.failed)
            raise CopyscanError(f"{len(outcome.failed)} shard(s) could not be listed:\n{listing_errors}")
        found = sorted((r for _, r in outcome.results), key=lambda r: r["source"])
        listing = pa.table(
            {
                "prompt": [p for r in found for p in r["prompts"]],
                "source": [r["source"] for r in found for _ in r["keys"]],
                "key": [k for r in found for k in r["keys"]],
            }
        )
        no_prompt = [{"source": r["source"], "key": k} for r in found for k in r["no_prompt"]]
    if listing.num_rows == 0:
        raise CopyscanError(f"{cfg.generations} holds no generation with a prompt")
    table = assign_tasks(listing, cfg.prompts_per_task)
    counts = {"shards": shards, "without_prompt": len(no_prompt), "without_prompt_examples": no_prompt[:5]}
    table = table.replace_schema_metadata({"copyscan_listing": _dump(counts)})
    storage.write_parquet(url, table, so)
    return table, counts


def _dump(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


def _counts(table: pa.Table) -> dict[str, Any]:
    raw = (table.schema.metadata or {}).get(b"copyscan_listing")
    return json.loads(raw) if raw else {}


def _groups(table: pa.Table) -> dict[int, list[tuple[str, list[tuple[str, str]]]]]:
    """task → [(prompt, [(source, key), ...])], prompts in plan order."""
    by_task: dict[int, dict[str, list[tuple[str, str]]]] = {}
    for prompt, source, key, task in zip(
        *(table[c].to_pylist() for c in ("prompt", "source", "key", "task")), strict=True
    ):
        by_task.setdefault(task, {}).setdefault(prompt, []).append((source, key))
    return {task: list(prompts.items()) for task, prompts in by_task.items()}


def run_memorized(cfg: MemorizedConfig) -> dict[str, Any]:
    """Run (or resume) the job; returns the summary written to ``OUT/summary.json``. The run holds the
    lease on ``OUT`` throughout (a second writer is refused: ``indexing/store/lease.py``)."""
    with output_lease(cfg.out, "memorized", layout.MEMORIZED_CONFIG_NAME, cfg.storage_options) as lease:
        return _run_memorized(cfg, lease)


def _run_memorized(cfg: MemorizedConfig, lease: Lease) -> dict[str, Any]:
    so = cfg.storage_options
    t0 = time.time()
    resumed = claim_output(
        cfg.out, layout.MEMORIZED_CONFIG_NAME, to_dict(cfg), cfg.mode, MemorizedConfig.RESUME_KEYS, so
    )
    table, listing = plan(cfg)
    groups = _groups(table)
    done = finished_tasks(cfg.out, so)
    todo = sorted(t for t in groups if t not in done)
    _log_plan(cfg, table, groups, len(done), resumed)
    failed = _run_groups(cfg, groups, todo)
    markers = finished_tasks(cfg.out, so)
    summary = _summary(cfg, len(groups), markers, failed, listing)
    if not failed:
        summary["top_flagged"] = _rank(cfg, len(groups))
    summary["this_run"] = _this_run(todo, markers, time.time() - t0)
    summary["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lease.check()
    storage.write_json(layout.summary_url(cfg.out), summary, so)
    if failed:
        listing_text = "\n".join(f"  task {t:05d}: {err}" for t, err in failed)
        raise CopyscanError(f"{len(failed)} task(s) failed; rerun to resume:\n{listing_text}")
    return summary


def _log_plan(
    cfg: MemorizedConfig, table: pa.Table, groups: dict[int, list], done: int, resumed: bool
) -> None:
    logger.info(
        "memorized: %s generations of %s prompts in %d task(s), %d already done%s; graph at %d px, edge < %g, "
        "flag cliques >= %d",
        f"{table.num_rows:,}",
        f"{sum(len(g) for g in groups.values()):,}",
        len(groups),
        done,
        " (resumed)" if resumed else "",
        cfg.graph_size,
        cfg.edge_threshold,
        cfg.min_clique,
    )


def _run_groups(
    cfg: MemorizedConfig, groups: dict[int, list[tuple[str, list[tuple[str, str]]]]], todo: list[int]
) -> list[tuple[int, str]]:
    """One Ray task per task number in ``todo`` (``discover.run_task``), retried; returns those that
    still failed: [(task, error)]."""
    spec = GraphSpec.of(cfg)
    so = cfg.storage_options
    progress = Progress("memorized", len(todo), unit="tasks", item="generations")
    remote = ray.remote(run_task).options(num_cpus=cfg.task_cpus)
    outcome = run_tasks(
        lambda t: remote.remote(cfg.out, t, groups[t], spec, so),
        todo,
        max_in_flight=_max_in_flight(cfg),
        retries=cfg.retries,
        on_result=lambda t, marker: progress.update(1, marker["generations"]),
        describe=lambda t: f"memorized task {t:05d}",
    )
    return list(outcome.failed)


def _summary(
    cfg: MemorizedConfig,
    tasks: int,
    markers: dict[int, dict[str, Any]],
    failed: list[tuple[int, str]],
    listing: dict[str, Any],
) -> dict[str, Any]:
    """The summary's settings, task counts, failures, listing counts and the finished tasks' totals."""
    return {
        "generations_spec": cfg.generations,
        "graph_size": cfg.graph_size,
        "tiles": cfg.tiles,
        "edge_threshold": cfg.edge_threshold,
        "min_clique": cfg.min_clique,
        "tasks_total": tasks,
        "tasks_done": len(markers),
        "failed_tasks": [{"task": t, "error": err} for t, err in failed],
        "listing": listing,
        **_totals(markers),
    }


def _rank(cfg: MemorizedConfig, tasks: int) -> list[dict[str, Any]]:
    """Merges the ``tasks`` parts into ``OUT/memorized.parquet`` (flagged first, ranked); returns the
    top 20 flagged prompts for the summary."""
    so = cfg.storage_options
    ranked = merge_parts(cfg.out, tasks, so)
    storage.write_parquet(storage.join(cfg.out, layout.MEMORIZED_RESULT_NAME), ranked, so)
    flagged = ranked.filter(ranked["flagged"])
    return [
        {k: r[k] for k in ("rank", "prompt", "clique_size", "mean_clique_distance", "clique_exact")}
        for r in flagged.slice(0, 20).to_pylist()
    ]


def _this_run(todo: list[int], markers: dict[int, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The tasks run this time, their seconds and generations per second."""
    done_now = sum(markers[t]["generations"] for t in todo if t in markers)
    return {
        "tasks": len(todo),
        "seconds": round(seconds, 3),
        "generations_per_second": round(done_now / seconds, 1) if seconds > 0 else None,
    }


def _totals(markers: dict[int, dict[str, Any]]) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for m in markers.values():
        for reason, count in m["errors"].items():
            errors[reason] = errors.get(reason, 0) + count
    return {
        "prompts": sum(m["prompts"] for m in markers.values()),
        "generations": sum(m["generations"] for m in markers.values()),
        "images": sum(m["images"] for m in markers.values()),
        "flagged": sum(m["flagged"] for m in markers.values()),
        "inexact_cliques": sum(m["inexact"] for m in markers.values()),
        "errors": dict(sorted(errors.items())),
    }
