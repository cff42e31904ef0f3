"""Spec of minipaged/step_gc.py: Python's collector is paused while the engine steps and
catches up right after, so the step's many short-lived objects die young and nothing is
left uncollected."""

from __future__ import annotations

import gc
import weakref

import pytest

from minipaged.step_gc import collect_after
from tests.test_engine_bookkeeping import greedy, make_engine


class Node:
    """A tracked object that can sit in a reference cycle and be watched by a weakref."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def collector_on():
    was_on = gc.isenabled()
    gc.enable()
    yield
    if not was_on:
        gc.disable()


def test_the_collector_is_paused_inside_and_back_on_after(collector_on):
    with collect_after():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off():
    was_on = gc.isenabled()
    gc.disable()
    try:
        with collect_after():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        if was_on:
            gc.enable()


def test_the_collector_is_back_on_when_the_body_raises(collector_on):
    with pytest.raises(RuntimeError):
        with collect_after():
            raise RuntimeError("a failed step")
    assert gc.isenabled()


def test_cycles_made_inside_are_collected_as_soon_as_it_ends(collector_on):
    young_limit = gc.get_threshold()[0]
    with collect_after():
        pairs = []
        for _ in range(young_limit + 100):        # enough to have triggered a collection
            a, b = Node(), Node()
            a.other, b.other = b, a                # a cycle: refcounting alone cannot free it
            pairs.append(a)
        watched = weakref.ref(pairs[0])
        del pairs, a, b
        assert watched() is not None               # paused: nothing collected yet
    assert watched() is None


def test_a_body_that_allocated_past_the_threshold_is_followed_by_a_young_collection(
        collector_on, monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    with collect_after():
        keep = [Node() for _ in range(gc.get_threshold()[0] + 100)]
    assert calls and calls[-1] in (0, 1)          # young generations only, never a full scan
    del keep


def test_a_body_that_allocated_little_is_not_followed_by_a_collection(collector_on,
                                                                      monkeypatch):
    gc.collect(0)                                   # start from an empty young generation
    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation) or 0)
    with collect_after():
        pass
    assert calls == []


def test_the_engine_steps_with_the_collector_paused(collector_on):
    engine = make_engine()
    seen = []
    execute = engine.executor.execute

    def recording(*args, **kwargs):
        seen.append(gc.isenabled())
        return execute(*args, **kwargs)

    engine.executor.execute = recording
    engine.add_request("a", [3, 4, 5], greedy(2))
    engine.step()
    engine.step()
    assert seen == [False, False]
    assert gc.isenabled()
