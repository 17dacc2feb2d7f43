"""vitctl.background: a producer thread handing items over in order, and a consumer thread (Sink)."""

from __future__ import annotations

import threading

import pytest

from vitctl.background import Sink, produced


class Source:
    """An endless (or `stop`-long) source that records how far it got and whether it was closed."""

    def __init__(self, stop: int | None = None, fail_at: int | None = None):
        self.made, self.closed, self.stop, self.fail_at = 0, False, stop, fail_at

    def __iter__(self):
        try:
            while self.stop is None or self.made < self.stop:
                if self.made == self.fail_at:
                    raise ValueError(f"item {self.made}")
                yield self.made
                self.made += 1
        finally:
            self.closed = True


@pytest.mark.parametrize("depth", [1, 3])
def test_produced_hands_over_every_item_in_order_and_joins(depth):
    before = threading.active_count()
    assert list(produced(iter(Source(stop=50)), depth)) == list(range(50))
    assert threading.active_count() == before


def test_produced_raises_the_producers_error_in_place():
    items = produced(iter(Source(fail_at=3)), 2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="item 3"):
        next(items)


@pytest.mark.parametrize("error", [None, KeyboardInterrupt, RuntimeError])
def test_a_consumer_that_stops_stops_the_producer(error):
    """Closing early, or an exception (KeyboardInterrupt too) in the consumer's loop: the producer
    stops after its current item, its source is closed, and the thread is joined."""
    before = threading.active_count()
    source = Source()
    items = produced(iter(source), 2)
    if error is None:
        assert next(items) == 0
        items.close()
    else:
        with pytest.raises(error):
            for x in items:
                if x == 5:
                    raise error
        del items  # (the caller's frame lets go of the generator: it closes)
    assert source.closed and threading.active_count() == before


def test_sink_consumes_in_order_and_reports_a_failure_at_the_next_call():
    seen, dropped = [], []

    def consume(x):
        if x == "bad":
            raise OSError("disk full")
        seen.append(x)

    for threaded in (True, False):
        seen.clear(), dropped.clear()
        sink = Sink(consume, depth=2, discard=dropped.append, threaded=threaded)
        for x in range(10):
            sink.put(x)
        sink.flush()
        assert seen == list(range(10))
        with pytest.raises(OSError, match="disk full"):
            sink.put("bad")
            sink.flush()
        sink.put("after", check=False)  # taken, not consumed: discarded
        with pytest.raises(OSError):
            sink.put("later")
        sink.abort()
        assert seen == list(range(10)) and dropped == ["after"] and not sink.is_alive()


def test_sink_abort_discards_what_is_queued():
    started, go, seen, dropped = threading.Event(), threading.Event(), [], []
    sink = Sink(lambda x: (started.set(), go.wait(), seen.append(x)), depth=4, discard=dropped.append)
    sink.put(0)
    started.wait()  # item 0 is being consumed
    for x in range(1, 4):
        sink.put(x)
    aborter = threading.Thread(target=sink.abort)
    aborter.start()
    while not sink._stop:  # abort has begun: what follows the running item is dropped
        aborter.join(0.001)
    go.set()
    aborter.join()
    assert not sink.is_alive() and seen == [0] and dropped == [1, 2, 3]


def test_sink_close_writes_everything_and_joins():
    seen = []
    sink = Sink(seen.append, depth=1)
    for x in range(100):
        sink.put(x)
    sink.close()
    assert seen == list(range(100)) and not sink.is_alive()
