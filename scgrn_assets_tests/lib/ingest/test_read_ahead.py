"""read_ahead: same items in the same order, errors where they happened, producers stopped and closed."""

from __future__ import annotations

import threading
import time

import pytest

from scgrn_assets.lib.ingest.read_ahead import read_ahead


def test_items_arrive_in_order_and_are_produced_in_another_thread():
    producers = set()

    def items():
        for i in range(50):
            producers.add(threading.current_thread().name)
            yield i

    assert list(read_ahead(items(), depth=3, name="test-producer")) == list(range(50))
    assert producers == {"test-producer"}


def test_an_error_while_producing_comes_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("bad sample 3")

    received = []
    with pytest.raises(ValueError, match="bad sample 3"):
        for item in read_ahead(items()):
            received.append(item)
    assert received == [1, 2]


def test_stopping_early_stops_the_producer_and_closes_its_generator():
    produced, closed = [], threading.Event()

    def items():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    stream = read_ahead(items(), depth=1)
    assert next(stream) == 0
    stream.close()
    assert closed.wait(5)
    assert len(produced) <= 3  # at most depth items queued plus the one being produced


def test_the_producer_runs_ahead_while_the_consumer_works():
    def items():
        for i in range(4):
            time.sleep(0.2)  # like zlib or the parser: the GIL is free meanwhile
            yield i

    start = time.perf_counter()
    for _ in read_ahead(items(), depth=1):
        time.sleep(0.2)
    # Serial would take 1.6 s; overlapped about 1.0 s.
    assert time.perf_counter() - start < 1.4


@pytest.mark.timeout(30)
def test_stopping_early_with_a_full_queue_after_the_producer_failed_does_not_hang():
    failed = threading.Event()

    def items():
        yield from range(3)
        failed.set()
        raise OSError("disk read error")

    stream = read_ahead(items(), depth=2)
    assert next(stream) == 0
    assert failed.wait(10)  # items 1 and 2 fill the queue; the failure waits to be handed over
    closer = threading.Thread(target=stream.close, daemon=True)
    closer.start()
    closer.join(10)
    assert not closer.is_alive(), "closing hung: the producer never stopped"
