"""The router on its own (no Ray): consistent hashing on the first prompt blocks, bounded by outstanding tokens."""

import pytest

from rollserve.cluster.router import Router

BLOCK = 16


def prompt(first: int, tail: int = 0, length: int = 40) -> list[int]:
    return [first] * BLOCK + [tail] * (length - BLOCK)


def test_a_shared_first_block_routes_to_one_replica_while_load_allows():
    router = Router(4, BLOCK, load_factor=100)
    chosen = {router.choose(prompt(7, tail), 10, {0, 1, 2, 3}) for tail in range(20)}
    assert len(chosen) == 1


def test_distinct_prefixes_spread_and_a_route_is_stable():
    router = Router(2, BLOCK, load_factor=100)
    routes = [router.preferred(prompt(first), {0, 1})[0] for first in range(40)]
    assert set(routes) == {0, 1}
    assert routes == [Router(2, BLOCK).preferred(prompt(first), {0, 1})[0] for first in range(40)]


def test_an_overloaded_replica_passes_its_prefix_on():
    router = Router(2, BLOCK, load_factor=1.25)
    home = router.preferred(prompt(3), {0, 1})[0]
    picks = [router.choose(prompt(3, tail), 100, {0, 1}) for tail in range(8)]
    assert picks[0] == home and 1 - home in picks  # the home replica first, the other once it is full
    assert max(router.loads) <= 1.25 * sum(router.loads) / 2 + 100
    for replica in picks:
        router.done(replica, 100)
    assert router.loads == [0, 0]
    assert router.choose(prompt(3), 100, {0, 1}) == home  # idle again: back to the cached replica


def test_dead_replicas_are_skipped():
    router = Router(3, BLOCK)
    assert {router.choose(prompt(first), 1, {2}) for first in range(10)} == {2}


@pytest.mark.parametrize("kwargs, field", [({"prefix_blocks": 0}, "prefix_blocks"),
                                           ({"load_factor": 0.5}, "load_factor")])
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Router(2, BLOCK, **kwargs)
