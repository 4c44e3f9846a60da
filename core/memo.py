"""A memo for the length of one unit of work: rows that its many steps read alike (the
registry rows every job of an intake batch looks up), read once. Outside a scope nothing
is kept, so a request always reads what is committed now.

Only for rows that change rarely and whose staleness within the scope is harmless (a
department that stops accepting during a batch of a second or so is seen by that
batch's later jobs as still accepting, as a request that began a moment earlier would).
A load that raises is not kept."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

T = TypeVar("T")

_memo: ContextVar[dict[Hashable, Any] | None] = ContextVar("memo", default=None)


@contextmanager
def memo_scope() -> Iterator[None]:
    token = _memo.set({})
    try:
        yield
    finally:
        _memo.reset(token)


def memoized(key: Hashable, load: Callable[[], T]) -> T:
    """``load()``, once per ``key`` inside a ``memo_scope``; every time outside one."""
    memo = _memo.get()
    if memo is None:
        return load()
    if key not in memo:
        memo[key] = load()
    return memo[key]
