"""The micro-batcher: results in order, batches under load, errors per item and per batch, limits."""

import threading
import time

import pytest

from imret.batching import BatcherClosed, BatcherFull, MicroBatcher


def test_single_items_and_order():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    with MicroBatcher(fn, max_batch=4, max_wait_ms=0) as b:
        assert b(3) == 30
        assert [b.submit(i).result(5) for i in range(5)] == [0, 10, 20, 30, 40]
    assert all(len(c) == 1 for c in calls)


def test_concurrent_submissions_form_batches_and_each_gets_its_own_result():
    gate = threading.Event()
    seen = []

    def fn(items):
        gate.wait(5)  # the first batch blocks until every thread has submitted: the rest queue up
        seen.append(len(items))
        return [x * x for x in items]

    b = MicroBatcher(fn, max_batch=8, max_wait_ms=1)
    futs = {}
    lock = threading.Lock()

    def client(i):
        f = b.submit(i)
        with lock:
            futs[i] = f

    threads = [threading.Thread(target=client, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gate.set()
    assert {i: f.result(5) for i, f in futs.items()} == {i: i * i for i in range(40)}
    b.close()
    assert sum(seen) == 40 and max(seen) == 8 and len(seen) < 40
    s = b.stats()
    assert s.items == 40 and s.batches == len(seen) and s.max_size == 8 and s.mean_size == pytest.approx(40 / len(seen))
    assert sum(k * v for k, v in s.sizes.items()) == 40


def test_waits_up_to_max_wait_for_more_items():
    sizes = []

    def fn(items):
        sizes.append(len(items))
        return items

    with MicroBatcher(fn, max_batch=16, max_wait_ms=200) as b:
        f1 = b.submit(1)
        time.sleep(0.02)
        f2 = b.submit(2)
        assert (f1.result(5), f2.result(5)) == (1, 2)
    assert sizes == [2]


def test_an_exception_result_fails_only_its_item():
    def fn(items):
        return [ValueError(f"bad {x}") if x < 0 else x for x in items]

    with MicroBatcher(fn, max_batch=4, max_wait_ms=50) as b:
        good, bad = b.submit(1), b.submit(-1)
        assert good.result(5) == 1
        with pytest.raises(ValueError, match="bad -1"):
            bad.result(5)


def test_a_raising_function_fails_the_whole_batch_and_the_worker_survives():
    def fn(items):
        if 0 in items:
            raise RuntimeError("boom")
        return items

    with MicroBatcher(fn, max_batch=4, max_wait_ms=50) as b:
        f1, f2 = b.submit(0), b.submit(5)
        for f in (f1, f2):
            with pytest.raises(RuntimeError, match="boom"):
                f.result(5)
        assert b(7) == 7
        assert b.stats().errors == 1


def test_wrong_result_count_is_an_error():
    with MicroBatcher(lambda items: [], max_batch=2) as b:
        with pytest.raises(RuntimeError, match="0 results for 1 items"):
            b(1, timeout=5)


def test_full_queue_refuses_and_closed_batcher_refuses():
    gate = threading.Event()

    def fn(items):
        gate.wait(5)
        return items

    b = MicroBatcher(fn, max_batch=1, max_wait_ms=0, max_queue=2)
    first = b.submit(0)
    time.sleep(0.05)  # the worker holds item 0
    b.submit(1)
    b.submit(2)
    with pytest.raises(BatcherFull, match="2 requests are already waiting"):
        b.submit(3)
    gate.set()
    assert first.result(5) == 0
    b.close()
    with pytest.raises(BatcherClosed):
        b.submit(4)


@pytest.mark.parametrize("kw", [{"max_batch": 0}, {"max_batch": True}, {"max_wait_ms": -1}, {"max_queue": 0}])
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        MicroBatcher(lambda x: x, **kw)
