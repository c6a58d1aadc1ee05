"""copyscan.indexing.runtime.pool_ray.TaskStream: Ray tasks fed as items arrive, bounded in flight, retried,
then listed."""

from __future__ import annotations

from pathlib import Path

import pytest


def test_task_stream_bounds_in_flight_retries_and_forgets(ray_session, tmp_path):
    import ray

    from copyscan.indexing.runtime.pool_ray import TaskStream, run_tasks

    def square(x: int, folder: str) -> int:  # nested: pickled by value, so workers need not import tests
        mark = Path(folder) / f"tried_{x}"
        if x == 5 or (x == 3 and not mark.exists()):  # 3 fails once, 5 always
            mark.touch()
            raise ValueError(f"boom {x}")
        return x * x

    remote = ray.remote(square).options(num_cpus=0.25)
    seen: list[tuple[int, int]] = []
    stream = TaskStream(
        lambda x: remote.remote(x, str(tmp_path)),
        max_in_flight=2,
        retries=1,
        on_result=lambda x, result: seen.append((x, result)),
        keep_results=False,
    )
    for x in range(8):
        stream.add(x)
        assert len(stream.in_flight) <= 2
    outcome = stream.finish()
    assert sorted(seen) == [(x, x * x) for x in range(8) if x != 5]  # 3 succeeded on its retry
    assert (
        outcome.results == [] and [x for x, _ in outcome.failed] == [5] and "boom 5" in outcome.failed[0][1]
    )
    assert stream.items == {} and stream.in_flight == {}  # nothing held once done

    kept = run_tasks(lambda x: remote.remote(x, str(tmp_path)), [1, 2, 4], max_in_flight=1)
    assert sorted(kept.results) == [(1, 1), (2, 4), (4, 16)] and kept.failed == []


def test_run_pool_hands_on_result_the_actor_and_can_drop_results(ray_session):
    import ray

    from copyscan.indexing.runtime.pool_ray import run_pool

    class Doubler:  # nested: pickled by value
        def double(self, x: int) -> int:
            return 2 * x

    seen = []

    def on_result(item: int, result: int, actor) -> None:  # a second call on the actor that made it
        seen.append((item, result, ray.get(actor.double.remote(result))))

    outcome = run_pool(
        lambda: ray.remote(Doubler).options(num_cpus=0.25, max_concurrency=2).remote(),
        1,
        [1, 2, 3],
        lambda actor, x: actor.double.remote(x),
        per_actor=2,
        on_result=on_result,
        with_actor=True,
        keep_results=False,
    )
    assert sorted(seen) == [(1, 2, 4), (2, 4, 8), (3, 6, 12)]
    assert outcome.results == [] and outcome.failed == []
    kept = run_pool(
        lambda: ray.remote(Doubler).options(num_cpus=0.25).remote(), 1, [5], lambda a, x: a.double.remote(x)
    )
    assert kept.results == [(5, 10)]


def test_run_pool_keeps_its_actors_for_work_on_result_started(ray_session):
    """``before_close`` (the scan's stages, which embed crops on the pool's actors) runs before the actors
    are killed: calls it makes on them still succeed (without it, this raised ActorDiedError)."""
    import ray

    from copyscan.indexing.runtime.pool_ray import run_pool

    class Doubler:  # nested: pickled by value
        def double(self, x: int) -> int:
            return 2 * x

    later: list = []
    done: list[int] = []
    run_pool(
        lambda: ray.remote(Doubler).options(num_cpus=0.25).remote(),
        1,
        [1, 2],
        lambda actor, x: actor.double.remote(x),
        on_result=lambda item, result, actor: later.append((actor, result)),
        with_actor=True,
        before_close=lambda: done.extend(ray.get([a.double.remote(r) for a, r in later])),
    )
    assert sorted(done) == [4, 8]


def _echo_class():
    class Echo:  # nested: pickled by value, so workers need not import tests
        def echo(self, x: int) -> int:
            return x

    return Echo


def test_run_pool_gives_work_only_to_started_actors_and_grows(ray_session):
    """An actor the cluster cannot place (a resource no node has) gets no work: the others do it all; a size
    function read again as the run goes grows the pool; the peak counts started actors."""
    import ray

    from copyscan.indexing.runtime.pool_ray import run_pool

    made = []

    def make_actor():
        options = {"num_cpus": 0.25, "resources": {"nowhere": 1}} if not made else {"num_cpus": 0.25}
        made.append(options)
        return ray.remote(_echo_class()).options(**options).remote()

    sizes = iter([2, 2, 3])
    outcome = run_pool(make_actor, lambda: next(sizes, 3), list(range(12)), lambda a, x: a.echo.remote(x))
    assert sorted(x for x, _ in outcome.results) == list(range(12)) and outcome.failed == []
    assert made[0] == {"num_cpus": 0.25, "resources": {"nowhere": 1}}  # started, never placed, never used
    assert 1 <= outcome.peak_actors <= len(made) - 1


def test_run_pool_stops_when_no_actor_can_start(ray_session):
    import pytest
    import ray

    from copyscan.indexing.errors import CopyscanError
    from copyscan.indexing.runtime.pool_ray import run_pool

    def nowhere():
        return ray.remote(_echo_class()).options(num_cpus=0.25, resources={"nowhere": 1}).remote()

    with pytest.raises(CopyscanError, match="no actor could start in 3 s, so 2 item"):
        run_pool(nowhere, 2, [1, 2], lambda a, x: a.echo.remote(x), start_timeout=3)

    class Broken:  # its constructor raises, as a model whose weights are missing does
        def __init__(self):
            raise RuntimeError("no weights here")

        def echo(self, x):
            return x

    with pytest.raises(CopyscanError, match="3 actors failed to start.*no weights here"):
        run_pool(
            lambda: ray.remote(Broken).options(num_cpus=0.25).remote(), 1, [1], lambda a, x: a.echo.remote(x)
        )


def test_run_pool_calls_in_flight_follow_a_function(ray_session):
    """``per_actor`` as a function (the embedding pools' ``DecodeFanout``): read before each round of
    submissions, so an actor's calls in flight grow once the first results say they should."""
    import ray

    from copyscan.indexing.runtime.pool_ray import run_pool

    class Slow:  # nested: pickled by value
        def __init__(self):
            import threading

            self.lock, self.running, self.peaks = threading.Lock(), 0, []

        def work(self, x: int) -> int:
            import time

            with self.lock:
                self.running += 1
                self.peaks.append(self.running)
            time.sleep(0.2)
            with self.lock:
                self.running -= 1
            return x

        def peak_by_call(self) -> list[int]:
            return self.peaks

    actors, results, peaks = [], [], []

    def make_actor():
        actors.append(ray.remote(Slow).options(num_cpus=0.25, max_concurrency=4).remote())
        return actors[-1]

    outcome = run_pool(
        make_actor,
        1,
        list(range(9)),
        lambda a, x: a.work.remote(x),
        per_actor=lambda: 1 if len(results) < 2 else 3,
        on_result=lambda item, result: results.append(result),
        before_close=lambda: peaks.extend(ray.get(actors[0].peak_by_call.remote())),
    )
    assert sorted(x for x, _ in outcome.results) == list(range(9)) and len(actors) == 1
    assert peaks[:2] == [1, 1] and max(peaks) == 3, peaks  # one at a time, then three


def test_task_stream_follows_a_size_function(ray_session):
    import ray

    from copyscan.indexing.runtime import pool_ray

    remote = ray.remote(lambda x: x).options(num_cpus=0.1)
    limits = iter([1, 1, 3])
    stream = pool_ray.TaskStream(remote.remote, max_in_flight=lambda: next(limits, 3))
    stream.sized -= pool_ray.RESIZE_S  # re-read at the next item
    peak = 0
    for x in range(6):
        stream.add(x)
        peak = max(peak, len(stream.in_flight))
    assert sorted(r for _, r in stream.finish().results) == list(range(6)) and peak <= 3


def test_a_pool_leaves_room_for_its_decode_tasks(ray_session):
    """On a cluster without an autoscaler (the session's 2 CPUs), CPU embedding actors are capped so that a
    decode task still fits beside them and the scan actors: 2 actors of 0.5 CPU beside two scan actors of 0.5
    would take every CPU, and wait for ever on decode tasks that cannot start."""
    from copyscan.indexing.errors import CopyscanError
    from copyscan.indexing.runtime.cluster_ray import PoolSize, leave_room

    asked = PoolSize(2, actor_cpus=0.5, fixed=True)
    assert leave_room(asked, 0.5).cap == 2  # 1 CPU for actors, 0.5 left
    assert leave_room(asked, 0.5, reserved_cpus=1.0).cap == 1
    auto = PoolSize(8, cpus_per_actor=0.5, actor_cpus=0.5)
    assert leave_room(auto, 0.5, reserved_cpus=0.5)() == 2
    assert leave_room(PoolSize(2, num_gpus=1.0, actor_cpus=0.5, fixed=True), 0.5, 2.0).cap == 2  # GPU actors
    with pytest.raises(CopyscanError, match="no room for one actor of 0.5 CPU"):
        leave_room(asked, 0.5, reserved_cpus=1.5)


def test_decode_room_shares_the_free_cores_among_the_actors(ray_session):
    """The decode tasks per embedding actor that the session's 2 CPUs run at once: what the actors and the
    job's other actors leave, over the share of a core each task needs (indexing/embed/fanout.py)."""
    from copyscan.indexing.runtime.cluster_ray import PoolSize, decode_room

    one = PoolSize(1, actor_cpus=0.5, fixed=True)
    assert decode_room(one) == 1  # 1.5 free cores: one task on a core all its time
    assert decode_room(one, 0.25) == 6  # tasks that wait on storage three quarters of their time
    assert decode_room(one, 0.25, reserved_cpus=1.0) == 2  # beside two scan actors of 0.5 CPU
    assert decode_room(PoolSize(2, actor_cpus=0.5, fixed=True), 0.1) == 5  # 1 free core between 2 actors
    assert decode_room(one, 1.0, reserved_cpus=2.0) == 1  # never below one


def test_decode_workers_start_ahead_and_stay_in_the_pool(ray_session):
    """The workers started for a job's first decode tasks run the no-op task, then wait idle in Ray's pool
    (alive, for the decode tasks to reuse) rather than exiting."""
    import os

    import ray

    from copyscan.indexing.embed.decode_ray import start_decode_workers

    pids = ray.get(start_decode_workers(2, 0.5), timeout=120)
    assert len(pids) == 2 and all(pid != os.getpid() for pid in pids)
    for pid in pids:
        os.kill(pid, 0)  # still alive: raises ProcessLookupError if the worker exited


def test_an_embedding_actor_starts_with_one_malloc_arena_and_the_jobs_env(ray_session, monkeypatch):
    """The model runs on the threads of the actor's call pool: its process starts with ``ONE_ARENA_ENV``
    (from the job's env_vars here, as ``init_ray`` gives them), with the job's other env_vars (S3 endpoint).
    On a Ray whose job lacks it, the actor is given it as a runtime_env of its own."""
    import os
    from types import SimpleNamespace

    import ray

    from copyscan.indexing.embed import embed_ray
    from copyscan.indexing.runtime.malloc import ONE_ARENA_ENV

    assert "runtime_env" not in embed_ray.embed_actor_options(0.5, 0, 2)  # the job's env has it
    actor = embed_ray.make_embed_actor(
        embedder="effnet-lite0",
        weights=None,
        options=None,
        num_cpus=0.5,
        num_gpus=0,
        concurrency=2,
        torch_threads=0,
        decode_cpus=0.5,
        storage_options=None,
    )
    try:
        names = [*ONE_ARENA_ENV, "NO_ALBUMENTATIONS_UPDATE", "AWS_ENDPOINT_URL_S3"]
        env = ray.get(
            actor.__ray_call__.remote(lambda self: {k: os.environ.get(k) for k in names}), timeout=120
        )
    finally:
        ray.kill(actor)
    assert env == {
        **ONE_ARENA_ENV,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "AWS_ENDPOINT_URL_S3": os.environ["AWS_ENDPOINT_URL_S3"],
    }

    elsewhere = SimpleNamespace(runtime_env={"env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1"}})
    monkeypatch.setattr(embed_ray.ray, "get_runtime_context", lambda: elsewhere)
    assert embed_ray.embed_actor_options(0.5, 0, 2)["runtime_env"] == {"env_vars": ONE_ARENA_ENV}
