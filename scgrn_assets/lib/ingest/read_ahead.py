"""Run an iterator one or more items ahead in a background thread.

Ingest is a chain of stages that mostly release the GIL (zlib decompression, the compiled
text parser, numpy, HDF5/zarr I/O): reading and parsing sample k+1 while sample k is being
written keeps two cores busy instead of one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def read_ahead(items: Iterable[T], *, depth: int = 1, name: str = "read-ahead") -> Iterator[T]:
    """Yield the items of ``items``, produced in a thread at most ``depth`` items ahead of the consumer.

    An exception raised while producing is raised here, in the consumer's thread, when the
    consumer reaches it (items produced before it are delivered first). When the consumer
    stops early (``break``, an exception, ``close()``), the producer stops after its current
    item and closes ``items`` in its own thread, so files it holds open are closed.
    Memory: up to ``depth`` items wait in the queue, plus the one being produced.
    """
    if depth < 1:
        raise ValueError("depth must be at least 1")
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as error:  # handed to the consumer, which raises it in its own thread
            put(_Failure(error))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name=name, daemon=True)
    producer.start()
    try:
        while True:
            item = handoff.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        producer.join()
