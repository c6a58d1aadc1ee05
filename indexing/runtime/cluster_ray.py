"""What the Ray cluster can give a job's pools: resources alive now, whether an autoscaler can add nodes, whether
GPUs are there or can come, and standing requests that make the autoscaler scale up (and down when cleared).

A pool is sized from its work and the user's limits, then follows the cluster: ``PoolSize`` says how many actors
it wants *now* (the alive GPUs or CPUs, re-read as nodes join), and ``scale_request`` asks the autoscaler for
the whole pool's resources, so that nodes are started for it and go idle (and away) once the request is
cleared at the end of the job. On a cluster without an autoscaler both reduce to the resources alive.

The autoscaler is Ray's (v1 monitor: its status in the GCS key-value store, as ``ray status`` reads it; v2:
the cluster config it reports to the GCS). Whether a cluster whose nodes are not up yet offers GPUs is known
from the v2 config, or else by asking the v1 autoscaler for one GPU and seeing whether it launches a node.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import ray

from copyscan.indexing.errors import CopyscanError
from copyscan.indexing.runtime.pool_ray import PoolOutcome, run_pool

logger = logging.getLogger("copyscan")

T = TypeVar("T")

STATUS_KEY = (
    b"__autoscaling_status"  # the v1 monitor's report (ray._private.ray_constants.DEBUG_AUTOSCALING_STATUS)
)
PROBE_POLL_S = 0.5
PROBE_UPDATES = 3  # autoscaler updates without a launch after which a GPU request counts as infeasible


def alive() -> tuple[float, float]:
    """(CPUs, GPUs) of the nodes alive now."""
    resources = ray.cluster_resources()
    return float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))


def autoscaler_report() -> dict[str, Any] | None:
    """The v1 autoscaler's latest report (``autoscaler_report`` and its ``time``), or None when no autoscaler
    runs or it can start no node (a cluster of fixed nodes: Ray's read-only provider, node types ``node_<id>``)."""
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get(STATUS_KEY)
    if not raw:
        return None
    try:
        status = json.loads(raw)
        report = status["autoscaler_report"]
    except (ValueError, KeyError, TypeError):
        return None
    types = set(report.get("active_nodes") or {}) | set(report.get("pending_launches") or {})
    if types and all(t.startswith("node_") for t in types):
        return None
    return {**report, "time": status.get("time")}


def node_groups() -> list[dict[str, Any]] | None:
    """The node groups a v2 autoscaler reported to the GCS ({"name", "resources", "max_count"}), or None."""
    try:
        config = ray._private.state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older or newer Ray without it: treated as unknown
        return None
    if config is None or not config.node_group_configs:
        return None
    return [
        {"name": g.name, "resources": dict(g.resources), "max_count": g.max_count}
        for g in config.node_group_configs
    ]


def autoscaling() -> bool:
    """Whether an autoscaler can add nodes to this cluster."""
    groups = node_groups()
    if groups is not None:
        return any(g["max_count"] != 0 for g in groups)
    return autoscaler_report() is not None


_GPUS_POSSIBLE: dict[str, bool] = {}  # by GCS address: a job asks once (embedding, then training)


def gpus_possible(probe_s: float = 30.0) -> bool:
    """Whether the cluster has GPUs now or its autoscaler can start a node with one (asked once per cluster
    and process: a job's pools and tasks agree).

    Alive GPUs answer at once; a v2 autoscaler's node groups too. A v1 autoscaler is asked for one GPU
    (``request_resources``) for at most ``probe_s`` seconds: a GPU node launched (pending or up) means yes;
    ``PROBE_UPDATES`` autoscaler updates without a launch mean no node type has one. The request is cleared.
    """
    if alive()[1] > 0:
        return True
    address = ray.get_runtime_context().gcs_address
    if address not in _GPUS_POSSIBLE:
        _GPUS_POSSIBLE[address] = _gpus_possible(probe_s)
    return _GPUS_POSSIBLE[address]


def _gpus_possible(probe_s: float) -> bool:
    groups = node_groups()
    if groups is not None:
        return any(g["resources"].get("GPU", 0) > 0 and g["max_count"] != 0 for g in groups)
    first = autoscaler_report()
    if first is None:
        return False
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=[{"GPU": 1}])
    try:
        return _launched_for_request(first.get("time"), probe_s)
    finally:
        request_resources(bundles=[])


def _launched_for_request(since: float | None, probe_s: float) -> bool:
    """Poll the v1 autoscaler after a one-GPU request: True once a GPU is alive or a node is being launched."""
    deadline = time.monotonic() + probe_s
    updates, last = 0, since
    while time.monotonic() < deadline:
        if alive()[1] > 0:
            return True
        report = autoscaler_report() or {}
        if report.get("time") != last:
            last = report.get("time")
            updates += 1
            if report.get("pending_launches") or report.get("pending_nodes"):
                return True
            if updates >= PROBE_UPDATES:
                return False
        time.sleep(PROBE_POLL_S)
    logger.warning(
        "cluster: no answer from the autoscaler to a GPU request in %.0f s; using CPU actors", probe_s
    )
    return False


@dataclass(frozen=True)
class PoolSize:
    """How many actors a pool wants now: one per ``num_gpus`` alive GPUs (GPU actors) or per ``cpus_per_actor``
    alive CPUs (CPU actors: the other CPUs decode), at least one, at most ``cap`` (its work items and the
    user's limits). Called again as nodes join, so the pool grows with the cluster. ``fixed``: exactly ``cap``
    (the user named the count)."""

    cap: int
    num_gpus: float = 0.0
    cpus_per_actor: float = 4.0
    actor_cpus: float = 0.5  # what one actor holds (for the autoscaler's bundles)
    fixed: bool = False

    def __call__(self) -> int:
        if self.fixed:
            return max(1, self.cap)
        cpus, gpus = alive()
        fits = int(gpus // self.num_gpus) if self.num_gpus > 0 else int(cpus // self.cpus_per_actor)
        return max(1, min(self.cap, fits))

    def bundles(self, items: int) -> list[dict[str, float]]:
        """The resources of the whole pool for ``items`` work items, as autoscaler bundles: one per GPU actor,
        or one CPU per CPU a CPU actor plans for (bundles any CPU node fits)."""
        actors = max(1, min(self.cap, items))
        if self.num_gpus > 0:
            return [{"GPU": self.num_gpus, "CPU": self.actor_cpus}] * actors
        cpus = self.actor_cpus if self.fixed else self.cpus_per_actor
        return [{"CPU": 1.0}] * max(1, round(actors * cpus))

    def describe(self) -> str:
        kind = f"{self.num_gpus:g} GPU" if self.num_gpus > 0 else f"{self.actor_cpus:g} CPU"
        if self.fixed:
            return f"{self.cap} actor(s) of {kind}"
        per = f"{self.num_gpus:g} GPU" if self.num_gpus > 0 else f"{self.cpus_per_actor:g} CPUs"
        return f"up to {self.cap} actor(s) of {kind}, one per {per} alive"


def leave_room(size: PoolSize, keep_cpus: float, reserved_cpus: float = 0.0, what: str = "pool") -> PoolSize:
    """``size`` capped so that its CPU actors leave ``keep_cpus`` of the cluster's CPUs free, beside
    ``reserved_cpus`` held by the job's other actors (the scan actors): embedding actors wait on CPU decode
    tasks, so actors that take every CPU wait for ever. Only on a cluster without an autoscaler (one with an
    autoscaler starts nodes for the tasks waiting) and for CPU actors; CopyscanError when not even one fits."""
    if size.num_gpus > 0 or autoscaling():
        return size
    cpus = alive()[0]
    fit = int((cpus - reserved_cpus - keep_cpus) / size.actor_cpus + 1e-9)
    if fit < 1:
        raise CopyscanError(
            f"{what}: the cluster's {cpus:g} CPUs leave no room for one actor of {size.actor_cpus:g} CPU "
            f"beside {reserved_cpus:g} CPU of other actors and {keep_cpus:g} CPU for decode tasks: lower "
            "embed_actor_cpus, decode_cpus or scan_actor_cpus, or add CPUs"
        )
    if fit >= size.cap:
        return size
    if size.fixed:
        logger.warning(
            "%s: %d actor(s) of %g CPU asked for, %d fit beside %g CPU of other actors and %g CPU for decode "
            "tasks on this cluster's %g CPUs (more would wait for ever on their decoding); starting %d",
            what, size.cap, size.actor_cpus, fit, reserved_cpus, keep_cpus, cpus, fit,
        )  # fmt: skip
    return replace(size, cap=fit)


def decode_room(size: PoolSize, share: float = 1.0, reserved_cpus: float = 0.0) -> int:
    """Decode tasks per embedding actor that the cluster's CPUs run at once now, each one thread busy
    ``share`` of its time (``DecodeFanout.cpu_share``): the CPUs the ``size()`` actors and ``reserved_cpus``
    (the job's other actors) leave, shared among the actors, over ``share``; at least 1. Unbounded (1 << 30)
    where an autoscaler adds nodes for the tasks that wait."""
    if autoscaling():
        return 1 << 30
    actors = max(1, size())
    free = alive()[0] - actors * size.actor_cpus - reserved_cpus
    return max(1, int(free / actors / share + 1e-9))


@contextmanager
def scale_request(bundles: Sequence[dict[str, float]], what: str) -> Iterator[None]:
    """While the block runs, ask the autoscaler (when there is one) for ``bundles``, so it starts the nodes a
    pool will grow onto; cleared at the end, so they go idle and are removed after the idle timeout.

    Ray keeps one standing request per cluster: this replaces any other, and clearing it clears all."""
    if not bundles or not autoscaling():
        yield
        return
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=list(bundles))
    logger.info("cluster: asked the autoscaler for %d bundle(s) of %s (%s)", len(bundles), bundles[0], what)
    try:
        yield
    finally:
        request_resources(bundles=[])


def run_growing_pool(
    size: PoolSize, what: str, make_actor: Callable[[], Any], items: Sequence[T], submit, **options: Any
) -> PoolOutcome[T]:
    """``run_pool`` of ``size`` over ``items`` while the autoscaler is asked for the pool's resources; logs
    the pool's plan and the actors it had at its peak."""
    with scale_request(size.bundles(len(items)), what):
        outcome = run_pool(make_actor, size, items, submit, **options)
    logger.info("%s: %s; %d actor(s) at the peak", what, size.describe(), outcome.peak_actors)
    return outcome
