"""The one name this service takes from grpc's private modules, in one place.

grpc.aio raises `ExecuteBatchError` for a write to a call whose client went away
(cancelled, disconnected); no public name covers it. If grpc moves it, only this changes.
"""

from __future__ import annotations

from grpc._cython.cygrpc import (  # type: ignore[import-not-found]
    ExecuteBatchError as ExecuteBatchError,  # a write that failed: the client went away
)
