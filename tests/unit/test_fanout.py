"""copyscan.indexing.embed.fanout: the shards an embedding actor keeps in flight follow the measured cost an
image of a decode task and of the model; the model's clock counts overlapping calls once; a decode task's
own time leaves out its waits for the model."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from copyscan.indexing.embed import fanout as fanout_module
from copyscan.indexing.embed.decode import DecodedBatch, thread_core_seconds, timed_batches
from copyscan.indexing.embed.fanout import (
    HEADROOM,
    MAX_IN_FLIGHT,
    MIN_IN_FLIGHT,
    DecodeFanout,
    ModelClock,
    streams_needed,
)


def shard_stats(
    count: int, decode_task: float, worker: str, images: int, model_seconds: float, cpu: float | None = None
) -> dict:
    """The parts of a shard's stats marker (``write_shard_outputs``) that the fan-out reads (the decode task
    on a core all its time unless ``cpu`` says less)."""
    return {
        "count": count,
        "seconds": {
            "decode_wait": 0.0,
            "embed": 1.0,
            "decode_task": decode_task,
            "decode_task_cpu": decode_task if cpu is None else cpu,
        },
        "worker": worker,
        "actor_model": {"worker": worker, "images": images, "seconds": model_seconds},
    }


def test_streams_needed_follow_the_two_costs():
    # README "Throughput": a 2-thread CPU model at 108 images/s against one decode core at 568: two streams
    assert streams_needed(1 / 568, 1 / 108) == MIN_IN_FLIGHT
    # an H200 at 5,600 images/s against a decode core at 150: ~37 streams, with the headroom
    assert streams_needed(1 / 150, 1 / 5600) == int(np.ceil(HEADROOM * 5600 / 150)) == 47
    assert streams_needed(0.0, 0.01) == streams_needed(0.01, 0.0) == MIN_IN_FLIGHT  # nothing measured


def test_fanout_starts_at_two_then_follows_the_rates_within_the_cpus(caplog, monkeypatch):
    monkeypatch.setattr(fanout_module, "ROOM_S", 0.0)  # the room read again at every call
    room = [1 << 30]
    fanout = DecodeFanout(0, lambda share: room[0])
    assert fanout() == MIN_IN_FLIGHT and fanout.rates() is None
    # two GPU actors: 256-image shards decoded in 1.7 s each (6.6 ms an image), models at 0.2 ms an image
    fanout.observe(shard_stats(256, 1.7, "node-a:1", 256, 0.05))
    fanout.observe(shard_stats(256, 1.7, "node-b:2", 512, 0.1))
    decode, model = fanout.rates()
    assert decode == pytest.approx(1.7 / 256) and model == pytest.approx(0.15 / 768)
    with caplog.at_level(logging.INFO, logger="copyscan"):
        wanted = fanout()
        assert wanted == int(np.ceil(HEADROOM * decode / model)) == 43
        # a later marker of the same actor replaces its earlier one (its totals so far)
        fanout.observe(shard_stats(256, 1.7, "node-a:1", 768, 0.15))
        assert fanout() == wanted  # the same rates: no new line
        room[0] = 12  # the CPUs that 12 decode tasks per actor leave
        assert fanout() == 12
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "43 shard(s) in flight per actor" in lines[0] and "6.64 ms an image" in lines[0]
    assert "12 shard(s) in flight per actor (43 wanted; the CPUs allow 12 of tasks on a core 100%" in lines[1]
    room[0] = 0  # never below two, never above MAX_IN_FLIGHT
    assert fanout() == MIN_IN_FLIGHT
    fanout.observe(shard_stats(256, 100.0, "node-a:1", 768, 0.15))
    room[0] = 1 << 30
    assert fanout() == MAX_IN_FLIGHT


def test_the_cpus_room_is_read_again_only_every_room_s(monkeypatch):
    reads = []
    fanout = DecodeFanout(0, lambda share: reads.append(share) or 8)
    fanout.observe(shard_stats(256, 1.7, "a", 256, 0.05))
    assert [fanout() for _ in range(5)] == [8] * 5 and len(reads) == 1
    monkeypatch.setattr(fanout, "_room_at", fanout._room_at - fanout_module.ROOM_S)
    assert fanout() == 8 and reads == [1.0, 1.0]


def test_tasks_that_wait_on_storage_share_the_cores(monkeypatch):
    """A decode task on a core a quarter of its time (reading a remote tar): the room is asked for tasks of
    that share, so four run on each free core; the share is never taken below MIN_CPU_SHARE."""
    monkeypatch.setattr(fanout_module, "ROOM_S", 0.0)
    shares = []
    fanout = DecodeFanout(0, lambda share: shares.append(share) or int(6 / share))
    fanout.observe(shard_stats(256, 1.7, "a", 256, 0.05, cpu=0.425))
    assert fanout.cpu_share() == pytest.approx(0.25) and fanout() == 24 and shares == [pytest.approx(0.25)]
    fanout.observe(shard_stats(256, 100.0, "a", 512, 0.1, cpu=0.0))
    assert fanout.cpu_share() == fanout_module.MIN_CPU_SHARE


def test_a_fixed_count_is_kept_and_shards_without_rates_are_skipped():
    fanout = DecodeFanout(3, lambda share: 100)
    fanout.observe(shard_stats(256, 1.7, "a", 256, 0.05))
    assert fanout() == 3
    auto = DecodeFanout(0, lambda share: 100)
    auto.observe({"count": 0, "seconds": {"decode_task": 0.0}, "worker": "a"})  # every image rejected
    auto.observe({"count": 5, "seconds": {"decode_wait": 1.0, "embed": 1.0}})  # a marker from before
    assert auto.rates() is None and auto() == MIN_IN_FLIGHT
    seen = []
    report = auto.reporting(lambda item, stats: seen.append(item))
    report((0, "shard-0.tar"), shard_stats(10, 0.5, "a", 10, 0.01))
    assert seen == [(0, "shard-0.tar")] and auto.rates() == (pytest.approx(0.05), pytest.approx(0.001))


class Sleeper:
    """A model whose call takes ``seconds`` (the clock times calls, whatever they run)."""

    dim = 4

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return np.zeros((len(pixels), self.dim), np.float32)


def test_model_clock_counts_overlapping_calls_once():
    clock = ModelClock(Sleeper(0.3))
    assert clock.dim == 4  # the rest passes through
    t0 = time.perf_counter()
    calls = [threading.Thread(target=clock.embed, args=(np.zeros((8, 3, 2, 2), np.uint8),)) for _ in range(3)]
    for call in calls:
        call.start()
    for call in calls:
        call.join()
    wall = time.perf_counter() - t0
    clock.count(24)
    busy = clock.totals()
    assert busy["images"] == 24
    # three 0.3 s calls at once: ~0.3 s of model time (the sum would be 0.9)
    assert 0.29 <= busy["seconds"] <= wall + 0.01 < 0.8
    time.sleep(0.1)
    assert clock.busy_seconds() == pytest.approx(busy["seconds"], abs=2e-3)  # idle time is not counted


def test_a_decode_task_counts_its_own_work_not_its_waits():
    def batches():
        for _ in range(3):
            time.sleep(0.05)  # reading: waiting on storage, off the CPU
            t0 = time.thread_time()
            while time.thread_time() - t0 < 0.05:  # decoding: on the CPU
                pass
            yield DecodedBatch(pixels=np.zeros((2, 3, 4, 4), np.uint8))

    made = []
    for batch in timed_batches(batches()):
        made.append((batch.decode_seconds, batch.decode_cpu_seconds))
        time.sleep(0.2)  # the consumer (the model) is slower: the generator waits
    assert len(made) == 3, made
    for wall, cpu in made:  # its own ~0.1 s, not the 0.2 s waits; half of it on the CPU
        assert 0.095 <= wall < 0.2 and 0.045 <= cpu < 0.08, made


def test_a_thread_waiting_for_a_busy_core_counts_as_needing_one():
    """With more busy processes than cores, a spinning thread gets a fraction of a core; its wait in the
    run queue still counts, so a decode task slowed by the model is not taken for one waiting on storage."""
    if not os.path.exists("/proc/thread-self/schedstat"):
        pytest.skip("no schedstat here: a thread's CPU seconds stand for its time on a core")
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(2 * len(os.sched_getaffinity(0)))
    ]
    try:
        time.sleep(0.3)  # let them start spinning
        t0, c0, core0 = time.perf_counter(), time.thread_time(), thread_core_seconds()
        while time.perf_counter() - t0 < 0.6:
            pass
        wall = time.perf_counter() - t0
        cpu, core = time.thread_time() - c0, thread_core_seconds() - core0
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert cpu < 0.8 * wall, (cpu, wall)  # the cores were shared
    assert core > 0.9 * wall, (core, cpu, wall)
