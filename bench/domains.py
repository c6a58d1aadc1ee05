"""Benches over several image domains, seeds and embedders: options, work folders, and the per-domain summary.

A figure measured on the images copyscan was developed with says little about others (issue 27), so
``bench.copy_detection`` and ``bench.partial_copies`` run on each domain of
``copyscan.jobs.demo.sample_images.DOMAINS`` (``--domain art|icons|screenshots|all``), for each of
``--seed``'s seeds, and report every figure per domain, the spread over seeds (the noise a difference must
exceed) and the mean over domains.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from copyscan.jobs.demo.sample_images import DEFAULT_DOMAIN, DOMAINS

# (row label, path into a run's result) of the figures summarised
FIGURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("recall@1", ("recall@1",)),
    ("AP score", ("score", "ap")),
    ("AP score_norm", ("score_norm", "ap")),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--domain and --seed, the same in every multi-domain bench."""
    parser.add_argument(
        "--domain",
        default=DEFAULT_DOMAIN,
        choices=(*DOMAINS, "all"),
        help=f"image domain (sample_images.DOMAINS; default {DEFAULT_DOMAIN}, the corpus copyscan was "
        "developed with), or all of them in turn",
    )
    parser.add_argument(
        "--seed",
        type=int,
        nargs="+",
        default=[0],
        help="seeds of the queries (several: each figure per seed, their mean and spread)",
    )


def domains(choice: str) -> list[str]:
    return list(DOMAINS) if choice == "all" else [choice]


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("COPYSCAN_CACHE", pathlib.Path.home() / ".cache" / "copyscan"))


def work_dir(work: str | None, domain: str, train: int, negatives: int) -> pathlib.Path:
    """bench.copy_detection's work folder for ``domain`` (``--work`` gets one sub-folder per domain but the
    default one, so the default domain's folder is where it was before domains existed)."""
    if work is not None:
        return pathlib.Path(work) if domain == DEFAULT_DOMAIN else pathlib.Path(work) / domain
    suffix = "" if domain == DEFAULT_DOMAIN else f"-{domain}"
    return cache_dir() / "bench" / f"copy_detection{suffix}-{train}-{negatives}"


def _get(result: dict, path: Sequence[str]) -> float | None:
    value = result
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return None if value is None else float(value)


def summarise(
    runs: Sequence[dict],
    figures: Sequence[tuple[str, Sequence[str]]] = FIGURES,
    group: Callable[[dict], str] = lambda run: run.get("embedder_label", ""),
) -> dict:
    """runs: one result dict each, with "domain" and "seed" → {group: {"domains": {domain: {figure: {"seeds":
    {seed: value}, "mean", "spread"}}}, "mean": {figure: mean over domains of the per-domain means}}}.

    ``spread`` is max − min over seeds (0 with one seed): the noise from seeds a difference must exceed.
    """
    out: dict = {}
    for run in runs:
        entry = out.setdefault(group(run), {"domains": {}, "mean": {}})
        per_domain = entry["domains"].setdefault(run["domain"], {})
        for label, path in figures:
            value = _get(run, path)
            if value is not None:
                per_domain.setdefault(label, {"seeds": {}})["seeds"][str(run["seed"])] = value
    for entry in out.values():
        for per_domain in entry["domains"].values():
            for stats in per_domain.values():
                values = np.array(list(stats["seeds"].values()))
                stats["mean"] = float(values.mean())
                stats["spread"] = float(values.max() - values.min())
        for label, _ in figures:
            means = [d[label]["mean"] for d in entry["domains"].values() if label in d]
            if means:
                entry["mean"][label] = float(np.mean(means))
    return out


def table(summary: dict, figures: Sequence[tuple[str, Sequence[str]]] = FIGURES) -> str:
    """The summary as a markdown table: one row per (group, domain), each cell the mean over seeds with the
    per-seed values, and a mean row per group."""
    labels = [label for label, _ in figures]
    lines = [
        "| embedder | domain | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for name, entry in summary.items():
        for domain, stats in entry["domains"].items():
            cells = []
            for label in labels:
                if label not in stats:
                    cells.append("")
                    continue
                seeds = " / ".join(f"{v:.3f}" for v in stats[label]["seeds"].values())
                cells.append(
                    f"{stats[label]['mean']:.3f}" + (f" ({seeds})" if len(stats[label]["seeds"]) > 1 else "")
                )
            lines.append(f"| {name} | {domain} | " + " | ".join(cells) + " |")
        if len(entry["domains"]) > 1:
            cells = [f"{entry['mean'][label]:.3f}" if label in entry["mean"] else "" for label in labels]
            lines.append(f"| {name} | **mean** | " + " | ".join(cells) + " |")
    return "\n".join(lines)
