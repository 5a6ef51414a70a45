"""The server process's garbage-collector policy (vigil.core.server.GcSchedule)."""

from __future__ import annotations

import asyncio
import gc

from prometheus_client import CollectorRegistry

from vigil.core.server import NO_AUTOMATIC_FULL, Collector, GcSchedule


class FakeCollector:
    def __init__(self) -> None:
        self.threshold = (700, 10, 10)
        self.calls: list[str] = []

    def collect(self) -> int:
        self.calls.append("collect")
        return 3

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def get_threshold(self) -> tuple[int, int, int]:
        return self.threshold

    def set_threshold(self, threshold0: int, threshold1: int, threshold2: int) -> None:
        self.threshold = (threshold0, threshold1, threshold2)


def test_the_gc_module_is_a_collector() -> None:
    collector: Collector = gc
    assert collector.get_threshold()


async def test_start_freezes_start_up_and_turns_automatic_full_collections_off() -> None:
    fake = FakeCollector()
    ticks = iter([10.0, 10.25])
    schedule = GcSchedule(
        CollectorRegistry(), interval_s=600, collector=fake, timer=lambda: next(ticks)
    )
    schedule.start()
    try:
        # Whatever start-up left is collected once, then frozen: never scanned again.
        assert fake.calls == ["collect", "freeze"]
        # Young and middle collections as before; the full one only on the schedule.
        assert fake.threshold == (700, 10, NO_AUTOMATIC_FULL)
        assert schedule.collect() == 0.25
        assert fake.calls[-1] == "collect"
    finally:
        await schedule.stop()
    assert fake.threshold == (700, 10, 10)
    assert fake.calls[-1] == "unfreeze"


async def test_full_collections_run_every_interval_and_are_measured() -> None:
    fake = FakeCollector()
    now = [0.0]

    def timer() -> float:
        now[0] += 0.5  # each collection "takes" 0.5 s
        return now[0]

    registry = CollectorRegistry()
    schedule = GcSchedule(registry, interval_s=0, collector=fake, timer=timer)
    schedule.start()
    for _ in range(3):
        await asyncio.sleep(0)  # one turn of the loop: one scheduled collection
    await schedule.stop()
    full = fake.calls.count("collect") - 1  # the first was start-up's
    assert full >= 2
    assert registry.get_sample_value("vigil_gc_full_pause_seconds_count") == full
    assert registry.get_sample_value("vigil_gc_full_pause_seconds_sum") == 0.5 * full
    await schedule.stop()  # twice is harmless
    assert fake.calls.count("unfreeze") == 1
