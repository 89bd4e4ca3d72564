import pytest

from sdrpn.prefetch import prefetch, thread_map


def check(x: int) -> int:
    if x % 3 == 2:
        raise KeyError(f"bad {x}")
    return x * 10


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_results_and_errors_come_in_order(workers):
    got = []
    for future in prefetch(check, range(8), workers, ahead=2):
        try:
            got.append(future.result())
        except KeyError as err:
            got.append(str(err))
    assert got == [0, 10, "'bad 2'", 30, 40, "'bad 5'", 60, 70]


def test_no_more_than_ahead_items_are_computed_in_advance():
    started = []
    loads = prefetch(lambda x: started.append(x) or x, range(100), workers=4, ahead=5)
    held = [next(loads) for _ in range(6)]  # the consumer holds items 0 .. 5
    assert [f.result() for f in held] == list(range(6))
    loads.close()  # it stops early: what was queued is cancelled, the pool drained
    assert set(started) <= set(range(11)) and set(range(6)) <= set(started)  # 5 ahead of item 5 at most


def test_inline_when_no_workers():
    seen = []
    loads = prefetch(lambda x: seen.append(x) or x, range(3), workers=0, ahead=1)
    assert seen == []
    assert next(loads).result() == 0 and seen == [0]


@pytest.mark.parametrize(
    ("workers", "ahead", "message"),
    [(-1, 2, "workers must be an int >= 0, got -1"), (1, 0, "ahead must be an int >= 1, got 0")],
)
def test_bad_arguments(workers, ahead, message):
    with pytest.raises(ValueError, match=message):
        next(prefetch(check, range(3), workers, ahead))


@pytest.mark.parametrize("workers", [0, 1, 4])
def test_thread_map_keeps_order_and_raises(workers):
    assert thread_map(lambda x: x * 2, list(range(9)), workers) == [2 * x for x in range(9)]
    assert thread_map(lambda x: x, [], workers) == []
    with pytest.raises(KeyError, match="bad 2"):
        thread_map(check, [0, 1, 2, 3], workers)
