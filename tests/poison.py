"""Poison messages (issue 9): each one once crashed, froze or blinded the monitor."""

from __future__ import annotations

import orjson


def deep(depth: int, inner: bytes = b"1") -> bytes:
    return b'{"a":' * depth + inner + b"}" * depth


def poison_messages(good: bytes, huge: bool = True) -> list[tuple[bytes, str]]:
    """(message, expected reject reason) built around one well-formed event `good`."""
    ev = orjson.loads(good)
    feature = next(k for k, v in ev["features"].items() if isinstance(v, float))
    category = next(k for k, v in ev["features"].items() if isinstance(v, str))

    def with_(**over) -> bytes:
        return orjson.dumps({**ev, **over})

    def splice(field: str, value: bytes) -> bytes:
        return good[:-1] + b',"' + field.encode() + b'":' + value + b"}"

    placeholder = with_(features={**ev["features"], category: "@@@"})
    number = orjson.dumps(ev["features"][feature])
    out = [
        (placeholder.replace(b"@@@", b"pre\xffmium"), "not_json"),
        (splice("extra", deep(1000)), "not_json"),
        (splice("segment", deep(1000)), "not_json"),
        (b"[" * 10_000 + b"]" * 10_000, "not_json"),
        (with_(extra="x" * 1_200_000), "too_large"),
        (b"z" * 999_990, "not_json"),
        (with_(ts=1e15), "bad_timestamp"),
        (with_(ts=-1e15), "bad_timestamp"),
        (with_(ts="9999-12-31T23:59:59Z"), "bad_timestamp"),
        (good.replace(number, b"1e400", 1), "non_finite"),
        (good.replace(number, b"NaN", 1), "non_finite"),
        (good.replace(number, b"Infinity", 1), "non_finite"),
    ]
    if huge:
        out.append((b"{" * 50_000_000, "too_large"))
    out += [(with_(model=f"made-up-{i}"), "unknown_model") for i in range(200)]
    return out
