"""Small helpers shared by the integration tests."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(cond: Callable[[], object], timeout: float, what: str,
               diagnostics: Callable[[], str] = lambda: "") -> None:
    """Poll `cond` until it is truthy; fail with `what` and the diagnostics otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{diagnostics()}")
