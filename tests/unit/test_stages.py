"""Driver stages (indexing/runtime/stages.py): calls side by side up to the limit, back-pressure, errors."""

import threading
import time

import pytest

from copyscan.indexing.runtime.stages import Stages


def test_calls_run_side_by_side_up_to_the_limit():
    stages = Stages(3)
    release = threading.Event()
    started = []

    def wait(i):
        started.append(i)
        assert release.wait(10)

    for i in range(3):
        stages.submit(wait, i)
    deadline = time.monotonic() + 10
    while len(started) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(started) == [0, 1, 2]  # all three wait at once

    fourth = threading.Thread(target=stages.submit, args=(wait, 3))
    fourth.start()
    fourth.join(0.3)
    assert fourth.is_alive() and len(started) == 3  # back-pressure: the fourth waits for a free stage
    release.set()
    fourth.join(10)
    stages.finish()
    assert sorted(started) == [0, 1, 2, 3] and stages.peak == 3


def test_limit_is_read_again_at_each_submit():
    limit = [1]
    stages = Stages(lambda: limit[0])
    gate = threading.Event()
    running = []

    def hold():
        running.append(1)
        gate.wait(10)

    stages.submit(hold)
    limit[0] = 2  # the pool grew
    stages.submit(hold)  # does not wait: the new limit has room
    deadline = time.monotonic() + 10
    while len(running) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(running) == 2
    gate.set()
    stages.finish()
    assert stages.peak == 2


def test_an_error_stops_the_stages():
    stages = Stages(2)

    def boom():
        raise ValueError("stage broke")

    stages.submit(boom)
    with pytest.raises(ValueError, match="stage broke"):
        for _ in range(100):  # raised at a later submit, or at finish
            stages.submit(time.sleep, 0.01)
        stages.finish()
    stages.close()


def test_locked_calls_do_not_overlap():
    stages = Stages(4)
    inside, most = [0], [0]

    def count():
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.02)
        inside[0] -= 1

    locked = stages.locked(count)
    for _ in range(8):
        stages.submit(locked)
    stages.finish()
    assert most[0] == 1 and stages.peak > 1
