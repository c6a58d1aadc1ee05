"""The decode fan-out where reading waits on storage: index jobs over shards that answer late. Prints JSON.

An embedding actor keeps one decode task per shard in flight; with ``embed_concurrency=0`` (the default) the
count follows the measured costs (``copyscan.indexing.embed.fanout``): a decode task's seconds an image, the
model's, and the share of a decode task's time on a core, which sets how many fit the CPUs. On a 2-core
machine the model is the slower wherever decoding is CPU work, so the rule keeps 2, as before. Where the
shards lie on far object storage a task mostly waits, and two tasks leave the model idle. This bench puts
real shards (bench.embed's corpus, 256 px JPEGs) on a loopback S3 server (moto, as the tests start it)
behind the tests' fault proxy, which answers every GET of a shard ``--delay`` seconds late, and runs the
same index job (flat index, no whitening) with ``embed_concurrency=2`` (the count before) and ``0``,
alternated, ``--repeats`` times each. Per run: the embedding phase's seconds and images/s (from the shards'
stats markers: first start to last end), the most shards in flight at once, and the fan-out's log line.

    python -m bench.fanout_storage --shards 24 --per-shard 64 --delay 1.0 --repeats 2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _fault_proxy() -> Any:
    """The tests' fault-injecting proxy (tests/integration/s3_faults.py), loaded from its file."""
    spec = importlib.util.spec_from_file_location(
        "s3_faults", ROOT / "tests" / "integration" / "s3_faults.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class _Lines(logging.Handler):
    """The copyscan log lines of a run that name the shards in flight."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "in flight per actor" in text:
            self.lines.append(text)


def _phase(out: Path) -> dict[str, Any]:
    """The embedding phase from the shards' stats markers: seconds from the first start to the last end,
    images/s over them, and the most shards in flight at once."""
    stats = [json.loads(p.read_text()) for p in sorted((out / "embeddings" / "stats").glob("stats_*.json"))]
    spans = [(s["started"], s["started"] + s["wall_seconds"]) for s in stats]
    start, end = min(a for a, _ in spans), max(b for _, b in spans)
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    live = most = 0
    for _, step in events:
        live += step
        most = max(most, live)
    images = sum(s["count"] for s in stats)
    decode = sum(s["seconds"]["decode_task"] for s in stats)
    cpu = sum(s["seconds"]["decode_task_cpu"] for s in stats)
    return {
        "shards": len(stats),
        "images": images,
        "embed_seconds": round(end - start, 2),
        "images_per_s": round(images / (end - start), 1),
        "most_shards_in_flight": most,
        "decode_task_ms_per_image": round(1e3 * decode / images, 2),
        "decode_task_cpu_share": round(cpu / decode, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--per-shard", type=int, default=64)
    parser.add_argument("--delay", type=float, default=1.0, help="seconds every GET of a shard waits")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", help="kept shards and outputs (default: a temporary folder)")
    args = parser.parse_args(argv)

    from moto.server import ThreadedMotoServer

    from bench.embed import corpus_shards
    from copyscan.indexing.index_config import IndexConfig
    from copyscan.indexing.index_ray import run_index
    from copyscan.indexing.runtime.config import resolve
    from copyscan.indexing.store import storage
    from copyscan.jobs._runtime import init_ray, setup_logging

    setup_logging()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    faults = _fault_proxy()
    work = Path(args.work or tempfile.mkdtemp(prefix="copyscan-bench-fanout-"))
    shards = corpus_shards(work, args.shards * args.per_shard, args.per_shard, queries=0)["shards"]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    with contextlib.redirect_stdout(sys.stderr):  # moto announces its thread on stdout: keep stdout JSON
        server.start()
    lines = _Lines()
    logging.getLogger("copyscan").addHandler(lines)
    runs = []
    try:
        host, port = server.get_host_and_port()
        upstream = f"http://{host}:{port}"
        fs, _ = storage.get_fs("s3://bench", {"endpoint_url": upstream, "key": "bench", "secret": "bench"})
        fs.mkdir("bench")
        for url in shards:
            fs.put_file(url, f"bench/shards/{Path(url).name}")
        with faults.FaultProxy(upstream) as proxy:
            proxy.set_schedule([faults.Fault("slow", "GET", "/shards/", times=None, delay=args.delay)])
            so = {"endpoint_url": proxy.url, "key": "bench", "secret": "bench"}
            init_ray()
            for repeat in range(args.repeats):
                for concurrency in (2, 0):
                    out = work / f"index-c{concurrency}-{repeat}"
                    lines.lines.clear()
                    t0 = time.perf_counter()
                    cfg = resolve(
                        IndexConfig,
                        {
                            "shards": "s3://bench/shards",
                            "out": str(out),
                            "storage_options": so,
                            "whitening": "none",
                            "embed_concurrency": concurrency,
                            "mode": "overwrite",
                        },
                    )
                    run_index(cfg)
                    runs.append(
                        {
                            "embed_concurrency": concurrency,
                            "repeat": repeat,
                            "job_seconds": round(time.perf_counter() - t0, 2),
                            **_phase(out),
                            "fanout_log": list(lines.lines),
                        }
                    )
            injected = proxy.injected()
    finally:
        logging.getLogger("copyscan").removeHandler(lines)
        server.stop()
    print(
        json.dumps(
            {
                "bench": "fanout_storage",
                "cpus": os.cpu_count(),
                "shards": args.shards,
                "per_shard": args.per_shard,
                "delay_per_get_s": args.delay,
                "delayed_gets": injected,
                "runs": runs,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
