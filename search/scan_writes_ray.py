"""The scan's verified writes on Ray: a chunk's matches verified (pixels, dense, whole), then written, in Ray
tasks while the driver goes on with the next chunks (``search/scan_ray.py`` hands them over)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import ray

from copyscan.indexing.runtime import cluster_ray
from copyscan.indexing.runtime.pool_ray import TaskStream
from copyscan.search.results.write import write_chunk
from copyscan.search.scan import ChunkVerifier
from copyscan.search.scan_chunks import QueryChunk
from copyscan.search.scan_config import ScanConfig
from copyscan.search.scan_steps import Failures

logger = logging.getLogger("copyscan")


class VerifiedWrites:
    """``write_chunk`` with verification (pixels, dense), as one Ray task of ``verify_cpus`` CPUs per chunk.

    The driver goes on with the next chunks while earlier ones are verified. A task verifies its chunk's
    matches (in batches, decoding in threads) and only then writes the chunk's files and, last, its marker
    with the verification counts, so resume counts a chunk as done only once it is verified. At most
    ``verify_in_flight`` tasks run at once; beyond that the driver waits, and the embedding with it.
    """

    def __init__(self, cfg: ScanConfig, verify: ChunkVerifier, on_written: Callable[[dict[str, Any]], None]):
        in_flight = cfg.verify_in_flight or functools.partial(_verify_slots, cfg.verify_cpus)
        self.verify_ref = ray.put(verify)  # once, not per chunk: the manifest inside can be large
        self.remote = ray.remote(write_chunk).options(num_cpus=cfg.verify_cpus)
        self.on_written = on_written
        self.stream: TaskStream[tuple[QueryChunk, dict[str, Any]]] = TaskStream(
            self._submit,
            max_in_flight=in_flight,
            retries=cfg.retries,
            on_result=self._written,
            describe=lambda item: f"verifying {item[0].describe()}",
            keep_results=False,
        )
        logger.info(
            "scan: verification in Ray tasks of %g CPU, at most %s at once",
            cfg.verify_cpus,
            in_flight if isinstance(in_flight, int) else "2 per alive CPU",
        )

    def __call__(self, chunk: QueryChunk, args: dict[str, Any]) -> None:
        """Submit ``write_chunk(**args)`` for ``chunk``, verifying with this scan's verifier."""
        self.stream.add((chunk, args))
        self.stream.poll()

    def _submit(self, item: tuple[QueryChunk, dict[str, Any]]) -> ray.ObjectRef:
        return self.remote.remote(**item[1], verify=self.verify_ref)

    def _written(self, item: tuple[QueryChunk, dict[str, Any]], marker: dict[str, Any]) -> None:
        self.on_written(marker)

    def finish(self) -> Failures:
        """Wait for every task; the chunks whose verification or write failed for good, with the error."""
        return [(chunk, error) for (chunk, _), error in self.stream.finish().failed]


def _verify_slots(verify_cpus: float) -> int:
    """Verification tasks at once: two per ``verify_cpus`` of the CPUs alive now (so the driver runs ahead)."""
    return max(1, int(2 * cluster_ray.alive()[0] / verify_cpus))
