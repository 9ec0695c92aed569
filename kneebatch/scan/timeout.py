"""Calls that may never return (a read from a hung network mount): give up after a time limit."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def call_with_timeout(fn: Callable[..., T], timeout_s: float, *args: Any) -> T:
    """``fn(*args)``, or ``TimeoutError`` after ``timeout_s`` seconds.

    The call runs in a daemon thread; on a time-out that thread is abandoned (a read blocked in
    the kernel cannot be cancelled) and the caller goes on.
    """
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="kneebatch-read")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {timeout_s:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
