"""The server process's garbage-collector policy (issue 12): full collections wait for
GC_OLDEST_THRESHOLD middle-generation collections, and what startup built is frozen out of
every collection."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from payment_grpc.cli import freeze_startup_objects, tune_gc
from payment_grpc.config import Settings


@pytest.fixture
def restored_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored_gc")
def test_full_collections_wait_for_the_configured_count() -> None:
    young, middle, _ = gc.get_threshold()
    tune_gc(Settings.from_names({"GC_OLDEST_THRESHOLD": 250}))
    assert gc.get_threshold() == (young, middle, 250)
    tune_gc(Settings.from_names({}))
    assert gc.get_threshold() == (young, middle, 100)  # the default: 10 x Python's


@pytest.mark.usefixtures("restored_gc")
def test_startup_objects_leave_every_collection_but_startup_garbage_does_not_stay() -> None:
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    garbage = weakref.ref(Cycle())  # only a collection frees it
    kept = Cycle()
    freeze_startup_objects()
    assert garbage() is None  # collected, not frozen for good
    assert gc.get_freeze_count() > 0
    assert not any(o is kept for o in gc.get_objects())  # frozen: no collection walks it
