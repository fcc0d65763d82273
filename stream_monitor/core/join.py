"""Label join: predictions and delayed labels matched by model and event id.

Owns the label event contract (`decode_labels`: bytes -> `LabelEvent`s, malformed ones
become rejects with a reason) and one `JoinBuffer` per model. Predictions wait for
their label and labels that arrive first wait for their prediction; both are bounded
by count and by age (event time), so memory stays bounded however many predictions
never get a label. Everything that cannot be joined is counted by why. A label inside
the inference event is joined at once.

Ages are measured against the *other* stream: a prediction expires when labels newer
than its time plus `max_age` have arrived without its own (the label stream has moved
past its deadline), a waiting label when predictions that much newer have arrived. So
the outcome does not depend on how the two streams interleave in processing time, only
on event time. The buffer is plain dicts of tuples, `state()` / `from_state()` round-trip
it through JSON-friendly values (for checkpointing).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from itertools import islice, repeat
from typing import Any

import msgspec
import orjson

from stream_monitor.config import FieldMapping, JoinConfig
from stream_monitor.io.decode import Reject, parse_timestamp

# Unjoined reasons (the `reason` label of stream_monitor_labels_unjoined_total).
PREDICTION_EXPIRED = "prediction_expired"      # no label within max_age of label time
PREDICTION_EVICTED = "prediction_evicted"      # pushed out by max_predictions
PREDICTION_NO_ID = "prediction_without_event_id"
PREDICTION_DUPLICATE = "prediction_duplicate"  # an event id already waiting or joined
LABEL_UNKNOWN_EVENT = "label_unknown_event"    # its prediction never came (age or count)
LABEL_DUPLICATE = "label_duplicate"            # a second label for one event id
LABEL_UNKNOWN_MODEL = "label_unknown_model"
LABEL_MALFORMED = "label_malformed"            # also a reject (dead letter / rejects file)
UNJOINED_REASONS = (PREDICTION_EXPIRED, PREDICTION_EVICTED, PREDICTION_NO_ID,
                    PREDICTION_DUPLICATE, LABEL_UNKNOWN_EVENT, LABEL_DUPLICATE,
                    LABEL_UNKNOWN_MODEL, LABEL_MALFORMED)

_LABEL_TYPES = (str, int, float, bool)


class LabelEvent(msgspec.Struct, frozen=True, gc=False):
    """One decoded label event (a C-level struct: labels can be a tenth of the traffic)."""

    model: str
    event_id: str
    label: Any
    ts: float          # epoch seconds
    position: int      # line number (replay) or offset (Kafka)


def event_key(value: Any) -> str | None:
    """Event ids compare as strings (an int id and its string spelling are one event)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int):
        return str(value)
    return None


def decode_labels(messages: Sequence[bytes], positions: Sequence[int], fields: FieldMapping,
                  default_model: str | None = None
                  ) -> tuple[list[LabelEvent], list[Reject]]:
    """Label events of a batch; malformed ones become `label_malformed` rejects."""
    out: list[LabelEvent] = []
    rejects: list[Reject] = []
    mk, ik, lk, tk = fields.model, fields.event_id, fields.label, fields.ts
    for pos, raw in zip(positions, messages, strict=True):
        try:
            ev = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            rejects.append(Reject(pos, LABEL_MALFORMED, raw, detail=f"not JSON: {exc}"[:200]))
            continue
        if type(ev) is not dict:
            rejects.append(Reject(pos, LABEL_MALFORMED, raw,
                                  detail=f"label event is {type(ev).__name__}, not an object"))
            continue
        model = ev.get(mk, default_model)
        if type(model) is not str or not model:
            rejects.append(Reject(pos, LABEL_MALFORMED, raw, detail=f"no string '{mk}' field"))
            continue
        eid = event_key(ev.get(ik))
        if eid is None:
            rejects.append(Reject(pos, LABEL_MALFORMED, raw, model=model[:100],
                                  detail=f"'{ik}': expected a non-empty string or integer"))
            continue
        label = ev.get(lk)
        if not isinstance(label, _LABEL_TYPES) or (
                type(label) is float and not math.isfinite(label)):
            rejects.append(Reject(pos, LABEL_MALFORMED, raw, model=model[:100],
                                  detail=f"'{lk}': expected a number, string or boolean, got "
                                         f"{type(label).__name__}"))
            continue
        ts = parse_timestamp(ev.get(tk))
        if ts != ts:
            rejects.append(Reject(pos, LABEL_MALFORMED, raw, model=model[:100],
                                  detail=f"'{tk}': missing or not a timestamp"))
            continue
        out.append(LabelEvent(model, eid, label, ts, pos))
    return out, rejects


def looks_like_label(raw: bytes, fields: FieldMapping) -> bool:
    """A label line interleaved in an inference file: no features object, an id and a label.

    A byte test (no parse) so that inference lines pay nothing; a line that looks like a
    label but is not a valid one becomes a `label_malformed` reject.
    """
    return (f'"{fields.features}"'.encode() not in raw and f'"{fields.label}"'.encode() in raw
            and f'"{fields.event_id}"'.encode() in raw)


# A joined pair: (position, prediction ts, label ts, version, prediction, scores, segment,
# label). Position is the label's (or the inline event's) so pairs sort in input order.
Pair = tuple


class JoinBuffer:
    """One model's predictions waiting for labels and labels waiting for predictions."""

    def __init__(self, bounds: JoinConfig):
        self.bounds = bounds
        # event id -> (ts, version, prediction, scores, segment); insertion order = arrival
        self.predictions: dict[str, tuple] = {}
        # event id -> (ts, label, position)
        self.labels: dict[str, tuple] = {}
        # ids joined recently (duplicate detection), bounded like the predictions
        self.joined_ids: dict[str, None] = {}
        self.joined = 0
        self.unjoined: Counter = Counter()
        self.prediction_watermark = -math.inf   # newest prediction event time
        self.label_watermark = -math.inf        # newest label event time
        self.keep_segment = True                # False when no segment field is configured

    # -- input ----------------------------------------------------------------------

    def add_predictions(self, positions: Sequence[int], ts: Sequence[float],
                        outcomes: dict[str, list]) -> list[Pair]:
        """Buffer a batch of predictions; those carrying a label are joined at once.

        `outcomes` holds per-event lists (decode.OUTCOME_KEYS): event_id, prediction,
        scores, label, segment and model_version.
        """
        pairs: list[Pair] = []
        n = len(ts)
        versions = outcomes.get("model_version") or [None] * n
        if n and not set(map(type, versions)) <= {str, type(None)}:
            versions = [v if v is None else str(v) for v in versions]
        if n and ts:
            newest = max(ts)
            if newest != newest:  # NaN somewhere: max() of floats with NaN is order-bound
                newest = max((t for t in ts if t == t), default=math.nan)
            if newest == newest and newest > self.prediction_watermark:
                self.prediction_watermark = float(newest)
        rest = self._add_common(positions, ts, outcomes, versions) if n else None
        if rest is None:
            self._bound()
            return pairs
        keep_segment = self.keep_segment
        preds, labels, joined_ids, unjoined = self.predictions, self.labels, self.joined_ids, \
            self.unjoined
        ids, pr, sc, lb, sg = (outcomes[k] for k in ("event_id", "prediction", "scores",
                                                      "label", "segment"))
        rows = zip(positions, ts, ids, pr, sc, lb, sg, versions, strict=True)
        if rest is not True:
            rows = ((positions[i], ts[i], ids[i], pr[i], sc[i], lb[i], sg[i], versions[i])
                    for i in rest)
        for pos, t, eid, pred, scores, label, seg, version in rows:
            if version is not None and type(version) is not str:
                version = str(version)
            key = eid if type(eid) is str and eid else event_key(eid)
            if label is not None:  # inline label: joined at once
                if key is not None:
                    if key in joined_ids:
                        unjoined[LABEL_DUPLICATE] += 1
                        continue
                    joined_ids[key] = None
                    waiting = labels.pop(key, None)
                    if waiting is not None:  # the topic's label came first: a duplicate
                        unjoined[LABEL_DUPLICATE] += 1
                pairs.append((int(pos), t, t, version, pred, scores, seg, label))
                continue
            if key is None:
                unjoined[PREDICTION_NO_ID] += 1
                continue
            if key in joined_ids:
                unjoined[PREDICTION_DUPLICATE] += 1
                continue
            if key in preds:  # a re-sent prediction: the latest wins, counted once
                unjoined[PREDICTION_DUPLICATE] += 1
            waiting = labels.pop(key, None)
            if waiting is not None:
                joined_ids[key] = None
                pairs.append((waiting[2], t, waiting[0], version, pred, scores, seg, waiting[1]))
                continue
            # raw JSON slices (msgspec.Raw) are copied out so that a waiting prediction
            # does not keep its whole message alive
            if type(pred) is float:  # the prediction carries the score (see _add_common)
                scores = None
            elif scores is not None and type(scores) is not dict:
                scores = bytes(scores)
            if seg is not None:
                seg = (seg if type(seg) is dict else bytes(seg)) if keep_segment else None
            preds[key] = (t, version, pred, scores, seg)
        self.joined += len(pairs)
        self._bound()
        return pairs

    def _add_common(self, positions: Sequence[int], ts: Sequence[float],
                    outcomes: dict[str, list], versions: list) -> list[int] | bool | None:
        """The common batch (string ids, no inline labels, no duplicates) in C-level calls.

        Buffers what it can and returns the indices left for the per-event path: None
        when nothing is left, True when the whole batch needs it.
        """
        ids, labels_col = outcomes["event_id"], outcomes["label"]
        n = len(ids)
        if labels_col.count(None) != n or set(map(type, ids)) != {str}:
            return True
        idset = set(ids)
        if len(idset) != n or "" in idset or not idset.isdisjoint(self.joined_ids):
            return True
        matched = idset.intersection(self.labels) if self.labels else ()
        scores, segs = outcomes["scores"], outcomes["segment"]
        if set(map(type, outcomes["prediction"])) == {float}:
            # the prediction carries the score (a binary probability, or a regression
            # value): the scores object is not needed, nor kept
            scores = repeat(None)
        elif n and scores[0] is not None and type(scores[0]) is not dict and None not in scores:
            scores = list(map(bytes, scores))  # copy raw JSON slices out of the messages
        elif any(s is not None and type(s) is not dict for s in scores):
            scores = [s if s is None or type(s) is dict else bytes(s) for s in scores]
        if not self.keep_segment:
            segs = repeat(None)
        elif any(s is not None and type(s) is not dict for s in segs):
            segs = [s if s is None or type(s) is dict else bytes(s) for s in segs]
        entries = zip(ts, versions, outcomes["prediction"], scores, segs,
                      strict=False)  # segs may be repeat(None); the others have length n
        if not matched:
            before = len(self.predictions)
            self.predictions.update(zip(ids, entries, strict=True))
            # ids already waiting were replaced (the latest wins): count them
            replaced = n - (len(self.predictions) - before)
            if replaced:
                self.unjoined[PREDICTION_DUPLICATE] += replaced
            return None
        rest = []
        preds = self.predictions
        for i, (k, e) in enumerate(zip(ids, entries, strict=True)):
            if k in matched:
                rest.append(i)
            else:
                if k in preds:
                    self.unjoined[PREDICTION_DUPLICATE] += 1
                preds[k] = e
        return rest

    def add_labels(self, events: Sequence[LabelEvent]) -> list[Pair]:
        """Join labels to waiting predictions; the others wait (bounded) or are counted."""
        pairs: list[Pair] = []
        preds, labels, joined_ids, unjoined = self.predictions, self.labels, self.joined_ids, \
            self.unjoined
        for ev in events:
            key = ev.event_id
            pred = preds.pop(key, None)
            if pred is not None:
                joined_ids[key] = None
                pairs.append((ev.position, pred[0], ev.ts, pred[1], pred[2], pred[3], pred[4],
                              ev.label))
            elif key in joined_ids or key in labels:
                unjoined[LABEL_DUPLICATE] += 1
            else:
                labels[key] = (ev.ts, ev.label, ev.position)
            if ev.ts > self.label_watermark:
                self.label_watermark = ev.ts
        self.joined += len(pairs)
        self._bound()
        return pairs

    # -- bounds ---------------------------------------------------------------------

    def _bound(self) -> None:
        b = self.bounds
        self._expire(self.predictions, self.label_watermark - b.max_age, PREDICTION_EXPIRED)
        self._expire(self.labels, self.prediction_watermark - b.max_age, LABEL_UNKNOWN_EVENT)
        self._evict(self.predictions, b.max_predictions, PREDICTION_EVICTED)
        self._evict(self.labels, b.max_labels, LABEL_UNKNOWN_EVENT)
        excess = len(self.joined_ids) - b.max_predictions
        if excess > 0:
            for k in list(islice(self.joined_ids, excess)):
                del self.joined_ids[k]

    def _expire(self, waiting: dict[str, tuple], cutoff: float, reason: str) -> None:
        """Drop entries older than `cutoff`, oldest arrivals first.

        Checked in arrival order: an old entry behind a newer one waits until it reaches
        the front (at most the count bound), which keeps this O(expired) per batch.
        """
        if cutoff == -math.inf or not waiting:
            return
        gone = []
        for k, v in waiting.items():
            if v[0] < cutoff:
                gone.append(k)
            else:
                break
        for k in gone:
            del waiting[k]
        if gone:
            self.unjoined[reason] += len(gone)

    def _evict(self, waiting: dict[str, tuple], limit: int, reason: str) -> None:
        excess = len(waiting) - limit
        if excess > 0:
            for k in list(islice(waiting, excess)):
                del waiting[k]
            self.unjoined[reason] += excess

    # -- introspection and state ----------------------------------------------------

    def oldest_prediction_age(self) -> float:
        """Event-time age of the oldest waiting prediction (0 when none)."""
        for v in self.predictions.values():
            t = v[0]
            if t == t and self.prediction_watermark > -math.inf:
                return max(0.0, self.prediction_watermark - t)
            return 0.0
        return 0.0

    def state(self) -> dict[str, Any]:
        """A JSON-friendly snapshot (the checkpoint of this buffer)."""
        return {
            "predictions": [[k, _finite(v[0]), v[1], v[2], as_json(v[3]), as_json(v[4])]
                            for k, v in self.predictions.items()],
            "labels": [[k, _finite(v[0]), *v[1:]] for k, v in self.labels.items()],
            "joined_ids": list(self.joined_ids),
            "joined": self.joined,
            "unjoined": dict(self.unjoined),
            "prediction_watermark": _finite(self.prediction_watermark),
            "label_watermark": _finite(self.label_watermark),
        }

    @classmethod
    def from_state(cls, bounds: JoinConfig, state: dict[str, Any]) -> JoinBuffer:
        buf = cls(bounds)
        def entry(r: list) -> tuple:
            return (math.nan if r[1] is None else float(r[1]), *r[2:])

        buf.predictions = {r[0]: entry(r) for r in state["predictions"]}
        buf.labels = {r[0]: entry(r) for r in state["labels"]}
        buf.joined_ids = dict.fromkeys(state["joined_ids"])
        buf.joined = int(state["joined"])
        buf.unjoined = Counter(state["unjoined"])
        pw, lw = state["prediction_watermark"], state["label_watermark"]
        buf.prediction_watermark = -math.inf if pw is None else float(pw)
        buf.label_watermark = -math.inf if lw is None else float(lw)
        return buf


def as_json(v: Any) -> Any:
    """A value kept as raw JSON bytes (scores, segment), parsed; others unchanged."""
    if v is None or type(v) is dict:
        return v
    if isinstance(v, bytes | bytearray | memoryview) or type(v).__name__ == "Raw":
        try:
            return orjson.loads(bytes(v))
        except orjson.JSONDecodeError:
            return None
    return v


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None
