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


def read_topic(bootstrap: str, topic: str, expect: int, timeout: float = 30) -> list:
    """Messages of `topic` from the start, with a fresh group, until `expect` are read or
    `timeout` seconds pass."""
    import uuid

    from confluent_kafka import Consumer
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    c.subscribe([topic])
    out, deadline = [], time.monotonic() + timeout
    while len(out) < expect and time.monotonic() < deadline:
        out += [m for m in c.consume(500, 0.5) if m.error() is None]
    c.close()
    return out
