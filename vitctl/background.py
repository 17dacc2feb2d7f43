"""Work on one background thread beside the caller, handed over through a bounded queue.

stdlib only. Two faces of one mechanism (a daemon thread, a bounded queue, a terminal marker):

- `produced(items, depth)`: `items` is iterated on the thread, up to `depth` items ahead of
  the caller, who receives them in order. The producer's exception is raised in the caller
  where its item would have been. When the caller stops early (closes the generator, or an
  exception, KeyboardInterrupt included, leaves its loop), the producer stops after the item
  it is producing and the thread is joined before control returns.
- `Sink(consume, depth)`: the caller puts items, the thread calls `consume(item)` on each, in
  order. The first exception of `consume` is raised by the caller's next `put` or `flush`;
  items after it go to `discard` (so that their resources are let go), as do the items still
  queued when `abort` is called. `Sink(..., threaded=False)` calls `consume` in `put` itself
  (the same calls in the same order, without the thread; a failing `put` raises at once).

Neither side polls or sleeps: every wait is a blocking queue operation that the other side
is guaranteed to answer (the producer always ends with the marker; the sink's thread takes
every item), and a blocking wait in the main thread is interruptible by signals.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()  # the last item a producer thread puts


def produced(items: Iterable[T], depth: int = 1, name: str = "vitctl-producer") -> Iterator[T]:
    """The items of `items`, produced on a background thread at most `depth` ahead of the caller."""
    ready: queue.Queue = queue.Queue(max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        error = None
        try:
            for item in items:
                ready.put(item)  # blocks while `depth` items wait; the caller's drain below frees room
                del item
                if stop.is_set():
                    break
        except BaseException as e:  # noqa: BLE001  (handed to the caller)
            error = e
        finally:
            close = getattr(items, "close", None)
            if stop.is_set() and close is not None:
                try:
                    close()  # a generator's own cleanup runs on its thread
                except BaseException as e:  # noqa: BLE001
                    error = error or e
            ready.put((_DONE, error))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    finished = False
    try:
        while True:
            item = ready.get()
            if type(item) is tuple and len(item) == 2 and item[0] is _DONE:
                finished = True
                if item[1] is not None:
                    raise item[1]
                return
            yield item
            del item
    finally:
        if not finished:
            stop.set()
            while True:  # take what the producer puts until its marker: it is never left blocked
                item = ready.get()
                if type(item) is tuple and len(item) == 2 and item[0] is _DONE:
                    break
                del item
        thread.join()


class Sink:
    """A background thread that calls `consume(item)` on every item put, in order.

    `put` waits while `depth` items are queued. After `consume` raises, the exception is raised
    by the next `put` or `flush` (every later call, until `close` or `abort`), and the items
    that follow go to `discard`. `flush` returns when every item put has been taken;
    `close` flushes and joins the thread; `abort` sends every queued item to `discard` and
    returns when the thread has ended (no `consume` runs after it returns).
    """

    def __init__(self, consume: Callable[[Any], None], depth: int = 8, discard: Callable[[Any], None] | None = None,
                 name: str = "vitctl-sink", threaded: bool = True):  # fmt: skip
        self._consume, self._discard = consume, discard
        self._queue: queue.Queue = queue.Queue(max(1, depth))
        self.error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True) if threaded else None
        if self._thread is not None:
            self._thread.start()

    def _take(self, item: Any) -> None:
        if self.error is None and not self._stop:
            try:
                self._consume(item)
            except BaseException as e:  # noqa: BLE001  (raised by the caller's next put or flush)
                self.error = e
        elif self._discard is not None:
            self._discard(item)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _DONE:
                    return
                self._take(item)
                del item
            finally:
                self._queue.task_done()

    def check(self) -> None:
        """Raises the exception `consume` raised, if it did."""
        if self.error is not None:
            raise self.error

    def put(self, item: Any, check: bool = True) -> None:
        """Queues `item` (waits for room); with `check`, first raises an earlier failure of `consume`."""
        if check:
            self.check()
        if self._thread is None:
            self._take(item)
            if check:
                self.check()
        else:
            self._queue.put(item)

    def flush(self) -> None:
        if self._thread is not None:
            self._queue.join()
        self.check()

    def close(self) -> None:
        if self._thread is None:
            self.check()
        elif self._thread.is_alive():
            self.flush()
            self._queue.put(_DONE)
            self._thread.join()

    def abort(self) -> None:
        self._stop = True
        if self.is_alive():
            self._queue.put(_DONE)
            self._thread.join()

    def is_alive(self) -> bool:
        """Whether the thread still runs (False without one)."""
        return self._thread is not None and self._thread.is_alive()
