"""indexing.runtime.pool_ray.TaskStream: Ray tasks fed as items arrive, bounded in flight, retried, then listed."""

from __future__ import annotations

from pathlib import Path


def test_task_stream_bounds_in_flight_retries_and_forgets(ray_session, tmp_path):
    import ray

    from indexing.runtime.pool_ray import TaskStream, run_tasks

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

    from indexing.runtime.pool_ray import run_pool

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
