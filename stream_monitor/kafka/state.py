"""State: one model's snapshot (everything the monitor knows about it) to bytes and back.

What a snapshot holds, per model: the open windows' accumulators (engine.py, with the
exact fixed-point sums as integers), the window clock (watermark, closed and late
counts), the alert policy's state for the model (hysteresis, pending detector alarms,
the last report's features), the sequential detectors (`ModelDetectors.to_state`), a
baseline in progress (or the reference a finished baseline built), the label join
buffer, performance windows, reference statistics and concept-drift detector, the
retraining triggers, and the model's newest event time. What the config and the
reference file define (layouts, settings, bins) is not in it: a snapshot is restored
into a `Monitor` built from the same config, and refused (`StateError`) when the
model's layout differs.

Format: `MAGIC`, a 2-byte big-endian format version, then one msgpack document
(msgspec). Values are tagged trees: a list whose first item is a msgpack extension
value `Ext(tag, b"")` is a tagged value (`_T_*` below): numpy arrays travel as dtype,
shape and raw bytes; Python integers beyond 64 bits (the fixed-point sums) as signed
big-endian bytes; tuples, sets, Counters, dicts with non-string keys and the monitor's
own small state classes keep their types. Concept-drift detectors are river objects
and are stored as a pickle that only river's and numpy's classes may appear in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import pickle
from collections import Counter
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np

if TYPE_CHECKING:
    from stream_monitor.pipeline import Monitor

MAGIC = b"SMST"
VERSION = 1

_T_ARRAY, _T_INT, _T_TUPLE, _T_SET, _T_FROZENSET, _T_COUNTER, _T_DICT, _T_OBJECT, \
    _T_OBJARRAY, _T_RIVER, _T_STRUCT = range(1, 12)
_INT64 = (-(1 << 63), (1 << 63) - 1)
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class StateError(ValueError):
    """A snapshot that cannot be restored: corrupt, another format version, another
    model or another layout. The message is one line, fit to show a user."""


# -- tagged values --------------------------------------------------------------------------

def _tag(t: int, payload: Any) -> list:
    return [msgspec.msgpack.Ext(t, b""), payload]


def pack(v: Any) -> Any:
    """A value -> a msgpack-encodable tree that `unpack` turns back into an equal value."""
    if v is None or isinstance(v, (bool, str, bytes)):
        return v
    if isinstance(v, float):
        return float(v)
    if isinstance(v, int):
        v = int(v)
        return v if _INT64[0] <= v <= _INT64[1] else _tag(
            _T_INT, v.to_bytes((v.bit_length() + 8) // 8, "big", signed=True))
    if isinstance(v, np.generic):
        return pack(v.item())
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            return _tag(_T_OBJARRAY, [list(v.shape), [pack(x) for x in v.ravel().tolist()]])
        a = np.ascontiguousarray(v)
        return _tag(_T_ARRAY, [a.dtype.str, list(a.shape), a.tobytes()])
    if isinstance(v, Counter):
        return _tag(_T_COUNTER, [[pack(k), pack(c)] for k, c in v.items()])
    if isinstance(v, dict):
        if all(type(k) is str for k in v):
            return {k: pack(x) for k, x in v.items()}
        return _tag(_T_DICT, [[pack(k), pack(x)] for k, x in v.items()])
    if isinstance(v, list):
        return [pack(x) for x in v]
    if isinstance(v, tuple):
        return _tag(_T_TUPLE, [pack(x) for x in v])
    if isinstance(v, (set, frozenset)):
        return _tag(_T_FROZENSET if isinstance(v, frozenset) else _T_SET, _canonical(v))
    if isinstance(v, msgspec.Struct):
        return _tag(_T_STRUCT, [_class_name(v), {f: pack(getattr(v, f))
                                                  for f in v.__struct_fields__}])
    if type(v).__module__.startswith("river."):
        return _tag(_T_RIVER, pickle.dumps(v, protocol=5))
    if dataclasses.is_dataclass(v) or hasattr(v, "__dict__"):
        return _tag(_T_OBJECT, [_class_name(v), {k: pack(x) for k, x in vars(v).items()}])
    raise TypeError(f"no snapshot encoding for {type(v).__name__}")


def _canonical(items: set | frozenset) -> list:
    # a set's iteration order depends on how it was built, not only on what it holds:
    # equal states must give equal bytes (a rollback is checked by comparing them)
    packed = [pack(x) for x in items]
    return sorted(packed, key=msgspec.msgpack.encode)


def unpack(v: Any) -> Any:
    if isinstance(v, list):
        if v and isinstance(v[0], msgspec.msgpack.Ext):
            return _untag(v[0].code, v[1])
        return [unpack(x) for x in v]
    if isinstance(v, dict):
        return {k: unpack(x) for k, x in v.items()}
    return v


def _untag(t: int, p: Any) -> Any:
    if t == _T_ARRAY:
        dtype, shape, raw = p
        return np.frombuffer(raw, np.dtype(dtype)).reshape(shape).copy()
    if t == _T_OBJARRAY:
        shape, items = p
        out = np.empty(len(items), object)
        out[:] = [unpack(x) for x in items]
        return out.reshape(shape)
    if t == _T_INT:
        return int.from_bytes(p, "big", signed=True)
    if t == _T_TUPLE:
        return tuple(unpack(x) for x in p)
    if t == _T_SET:
        return {unpack(x) for x in p}
    if t == _T_FROZENSET:
        return frozenset(unpack(x) for x in p)
    if t == _T_COUNTER:
        return Counter({unpack(k): unpack(c) for k, c in p})
    if t == _T_DICT:
        return {unpack(k): unpack(x) for k, x in p}
    if t == _T_STRUCT:
        return _own_class(p[0])(**{k: unpack(x) for k, x in p[1].items()})
    if t == _T_OBJECT:
        obj = object.__new__(_own_class(p[0]))
        obj.__dict__.update({k: unpack(x) for k, x in p[1].items()})
        return obj
    if t == _T_RIVER:
        return _RiverUnpickler(io.BytesIO(p)).load()
    raise StateError(f"unknown value tag {t}")


def _class_name(v: Any) -> str:
    return f"{type(v).__module__}:{type(v).__qualname__}"


def _own_class(name: str) -> type:
    """Only the monitor's own classes are rebuilt from a snapshot (no arbitrary code)."""
    module, _, qualname = name.partition(":")
    if not module.startswith("stream_monitor.") or "." in qualname:
        raise StateError(f"snapshot names a class outside stream_monitor: {name}")
    cls = getattr(importlib.import_module(module), qualname, None)
    if not isinstance(cls, type):
        raise StateError(f"snapshot names an unknown class: {name}")
    return cls


class _RiverUnpickler(pickle.Unpickler):
    """Only river's classes (and a `getattr` without dunder names, which river's pickles
    use for bound methods) may appear: a snapshot cannot run arbitrary code."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name == "getattr":
            return _plain_getattr
        if module.split(".")[0] == "river":
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise StateError(f"snapshot pickle names {module}.{name}, not a river class")


def _plain_getattr(obj: Any, name: str) -> Any:
    cls = obj if isinstance(obj, type) else type(obj)
    if cls.__module__.split(".")[0] != "river" or name.startswith("__"):
        raise StateError(f"snapshot pickle reads attribute {name!r}")
    return getattr(obj, name)


# -- one model ------------------------------------------------------------------------------

def _layout_fingerprint(monitor: Monitor, model: str) -> str:
    """What a snapshot's arrays are laid out by: the model's columns and their bins."""
    pipe = monitor.models.get(model)
    if pipe is None:
        return "baseline"
    lay = pipe.evaluator.layout
    h = hashlib.sha256()
    for names in (pipe.schema.numeric, pipe.schema.categorical):
        h.update("\x1f".join(names).encode() + b"\x1e")
    h.update(lay.numeric.offsets.tobytes() + lay.categorical.offsets.tobytes())
    for e in lay.numeric.edges:
        h.update(np.ascontiguousarray(e, np.float64).tobytes())
    return h.hexdigest()[:16]


_BASELINE = ("columns", "predictions", "labels", "absent", "rows")  # a builder's rows so far


def _model_state(monitor: Monitor, model: str) -> dict[str, Any]:
    if model not in monitor.config.models:
        raise KeyError(f"no model {model!r} in the config")
    policy = monitor.policy
    state: dict[str, Any] = {
        "model": model,
        "layout": _layout_fingerprint(monitor, model),
        "newest_event": monitor.newest_event.get(model),
        "violations": monitor.violations.get(model),    # for the next kept event
        "policy": {
            "states": {k: v for k, v in policy.states.items() if k[0] == model},
            "windows_seen": policy.windows_seen.get(model),
            "detected": policy.detected.get(model),
            "last_features": policy.last_features.get(model),
        },
    }
    pipe = monitor.models.get(model)
    if pipe is not None:
        w = pipe.windows
        state["windows"] = {"open": w._open, "watermark": w._watermark,
                            "closed_count": w.closed_count, "late_events": w.late_events,
                            "recent": w._recent}  # event times the future check needs
        if pipe.detectors is not None:
            state["detectors"] = {"state": pipe.detectors.to_state(),
                                  "last": pipe.detectors.last}
        if monitor.config.models[model].reference is None:  # learned from a baseline
            state["reference"] = pipe.reference.to_json()
    else:
        builder, _ = monitor.baselines[model]
        state["baseline"] = {k: getattr(builder, k) for k in _BASELINE}
    if monitor.performance is not None and model in monitor.performance.models:
        mp = monitor.performance.models[model]
        attrs = {k: v for k, v in vars(mp).items() if k not in ("s", "reference", "buffer")}
        buffer = {k: v for k, v in vars(mp.buffer).items()
                  if k != "bounds" and not k.startswith("_")}  # not the undo journal
        state["performance"] = {"attrs": attrs, "buffer": buffer}
    if monitor.retrain is not None:
        state["retrain"] = {k: v for k, v in monitor.retrain.states.items() if k[0] == model}
        # schema alerts answered: fingerprints of this model's schema-change alerts
        state["schema_alerts"] = sorted(
            fp for fp in monitor.retrain.schema_alerts
            if any(k[0] == model and k[2] == "schema_change" and _fp(k) == fp
                   for k in policy.states))
    return state


def _fp(key: tuple) -> str:
    from stream_monitor.alerting.policy import fingerprint
    return fingerprint(*key)


def snapshot(monitor: Monitor, model: str) -> bytes:
    """Model `model`'s state as bytes (format `VERSION`)."""
    return frame(MAGIC, VERSION, _model_state(monitor, model))


def frame(magic: bytes, version: int, body: Any) -> bytes:
    """`body` as versioned bytes: 4 magic bytes, a 2-byte version, packed msgpack."""
    return magic + version.to_bytes(2, "big") + _encoder.encode(pack(body))


def unframe(data: Any, magic: bytes, version: int, what: str, hint: str = "") -> Any:
    """The body of `frame` bytes; StateError (one line, naming `what`) if `data` is not
    one, is of another version, or is corrupt."""
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:4]) != magic:
        raise StateError(f"not a stream-monitor {what} (bad magic bytes)")
    found = int.from_bytes(bytes(data[4:6]), "big")
    if found != version:
        raise StateError(f"{what} format version {found}, this stream-monitor reads "
                         f"version {version}{hint}")
    try:
        return unpack(_decoder.decode(bytes(data[6:])))
    except StateError:
        raise
    except Exception as exc:  # truncated or corrupted bytes: msgspec, numpy, pickle errors
        raise StateError(f"corrupt {what} ({type(exc).__name__}: {exc})") from None


def decode(data: bytes) -> dict[str, Any]:
    """A snapshot's contents (StateError if it is not one, or of another version)."""
    state = unframe(data, MAGIC, VERSION, "state snapshot",
                    " (discard the snapshot to start afresh)")
    if not isinstance(state, dict) or "model" not in state or "policy" not in state:
        raise StateError("corrupt state snapshot (no model state in it)")
    return state


def restore(monitor: Monitor, model: str, data: bytes) -> None:
    """Put a snapshot of `model` into `monitor` (built from the same config), replacing
    what it knows of the model."""
    state = decode(data)
    if state["model"] != model:
        raise StateError(f"the snapshot is of model {state['model']!r}, not {model!r}")
    if model not in monitor.config.models:
        raise StateError(f"no model {model!r} in the config to restore into")
    # a snapshot that does not fit changes nothing: what `checkpoint` does not cover
    # (baseline rows replaced wholesale, retraining triggers) is kept aside too
    before = monitor.checkpoint()
    builder = monitor.baselines[model][0] if model in monitor.baselines else None
    rows = {k: getattr(builder, k) for k in _BASELINE} if builder is not None else {}
    retrain = monitor.retrain
    triggers = (dict(retrain.states), set(retrain.schema_alerts)) if retrain else None
    try:
        _restore(monitor, model, state)
    except Exception as exc:
        monitor.rollback(before)
        for k, v in rows.items():
            setattr(builder, k, v)
        if retrain is not None:
            retrain.states, retrain.schema_alerts = triggers
        if isinstance(exc, StateError):
            raise
        raise StateError(f"corrupt state snapshot for {model!r} "
                         f"({type(exc).__name__}: {exc})") from None


def _restore(monitor: Monitor, model: str, state: dict[str, Any]) -> None:
    from stream_monitor.core.reference import Reference
    if "reference" in state and model not in monitor.models:  # a baseline finished
        builder, _ = monitor.baselines[model]
        monitor._activate(model, builder, Reference.from_json(state["reference"]))
    layout = _layout_fingerprint(monitor, model)
    if state["layout"] != layout:
        raise StateError(f"the snapshot of {model!r} was taken with another reference or "
                         f"feature layout (layout {state['layout']}, here {layout})")
    pipe = monitor.models.get(model)
    if pipe is not None:
        w, s = pipe.windows, state["windows"]
        w._open, w._watermark = s["open"], float(s["watermark"])
        w.closed_count, w.late_events = int(s["closed_count"]), int(s["late_events"])
        w._recent = np.asarray(s.get("recent", ()), np.float64)
        if pipe.detectors is not None:
            pipe.detectors.from_state(state["detectors"]["state"])
            pipe.detectors.last = state["detectors"]["last"]
    else:
        builder, _ = monitor.baselines[model]
        for k, v in state["baseline"].items():
            setattr(builder, k, v)
    policy, p = monitor.policy, state["policy"]
    for k in [k for k in policy.states if k[0] == model]:
        del policy.states[k]
    policy.states.update(p["states"])
    for attr, value in (("windows_seen", p["windows_seen"]), ("detected", p["detected"]),
                        ("last_features", p["last_features"])):
        target = getattr(policy, attr)
        target.pop(model, None)
        if value is not None:
            target[model] = value
    monitor.newest_event.pop(model, None)
    if state["newest_event"] is not None:
        monitor.newest_event[model] = state["newest_event"]
    monitor.violations.pop(model, None)
    if state.get("violations") is not None:
        monitor.violations[model] = np.asarray(state["violations"], np.int64)
    if "performance" in state and monitor.performance is not None:
        mp = monitor.performance.models[model]
        vars(mp).update(state["performance"]["attrs"])
        vars(mp.buffer).update(state["performance"]["buffer"])
    if "retrain" in state and monitor.retrain is not None:
        r = monitor.retrain
        for k in [k for k in r.states if k[0] == model]:
            del r.states[k]
        r.states.update(state["retrain"])
        r.schema_alerts.update(state["schema_alerts"])
