"""Pipeline: decode -> engine -> evaluate -> policy for every model, one batch at a time.

`Monitor` is the one object `replay`, `run` and `demo` drive; it does no I/O of its
own, so the same code path is measured by the benchmarks and exercised by the tests.
"""

from __future__ import annotations

import copy
import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np

from stream_monitor.alerting.policy import AlertPolicy
from stream_monitor.alerting.retrain import RetrainPolicy
from stream_monitor.config import (
    CATEGORICAL_METHODS,
    NUMERIC_METHODS,
    Config,
    ConfigError,
    model_settings,
    performance_settings,
)
from stream_monitor.core.detectors import Detection, ModelDetectors
from stream_monitor.core.engine import ClosedWindow, ModelWindows
from stream_monitor.core.evaluate import WindowEvaluator
from stream_monitor.core.join import LABEL_UNKNOWN_MODEL, decode_labels, scores_from_raw
from stream_monitor.core.performance import PerformanceStage, fault_state, performance_enabled
from stream_monitor.core.reference import Reference, ReferenceBuilder, ReferenceError
from stream_monitor.io.decode import (
    BAD_FEATURES,
    BAD_TIMESTAMP,
    FUTURE,
    LATE,
    DecodedBatch,
    Decoder,
    ModelSchema,
    Reject,
    outcome_lists,
)


@dataclass
class BatchResult:
    """What one batch produced: rejects to keep, closed-window reports, alert events."""

    messages: int = 0
    events: Counter = field(default_factory=Counter)        # per model, counted in stats
    rejects: list[Reject] = field(default_factory=list)
    reports: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    # per model, feature and block statistic: the last complete block's value
    block_stats: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    # performance monitoring: label events counted, closed performance windows,
    # retraining requests, labels that could not go to any model's join
    labels: Counter = field(default_factory=Counter)        # per model, label events counted
    performance: list[dict[str, Any]] = field(default_factory=list)
    retrain: list[dict[str, Any]] = field(default_factory=list)
    unjoined: Counter = field(default_factory=Counter)      # reason -> labels (no model)
    # scale-out: sequential detectors' alarms, (model, [(feature, method, value,
    # threshold)], block window) per block, judged by the merger with the merged windows
    alarms: list[tuple[str, list[tuple], dict[str, Any]]] = field(default_factory=list)

    def extend(self, other: BatchResult) -> None:
        self.messages += other.messages
        self.events.update(other.events)
        self.rejects += other.rejects
        self.reports += other.reports
        self.alerts += other.alerts
        self.detections += other.detections
        self.block_stats.update(other.block_stats)
        self.labels.update(other.labels)
        self.performance += other.performance
        self.retrain += other.retrain
        self.unjoined.update(other.unjoined)
        self.alarms += other.alarms


class ModelPipeline:
    """Windows and evaluator of one model, once its reference is known."""

    def __init__(self, name: str, config: Config, reference: Reference,
                 origin: str = "the reference"):
        self.name = name
        self.settings = model_settings(config, name)
        overrides = config.models[name].features
        unknown = sorted(set(overrides) - set(reference.features))
        if unknown:
            raise ConfigError([f"models.{name}.features.{u}: not a feature of {origin} "
                               f"(known: {_some(sorted(reference.features))})"
                               for u in unknown])
        problems = []
        for fname, o in overrides.items():
            ref_kind = reference.features[fname].kind
            where = f"models.{name}.features.{fname}"
            if o.kind and o.kind != ref_kind:
                problems.append(f"{where}.kind: {o.kind!r} contradicts the reference, which "
                                f"profiles it as {ref_kind} (rebuild the reference with "
                                f"this kind)")
            allowed = CATEGORICAL_METHODS if ref_kind == "categorical" else NUMERIC_METHODS
            if o.drift is not None and o.drift.method not in allowed:
                problems.append(f"{where}.drift.method: {o.drift.method!r} does not apply to "
                                f"a {ref_kind} feature (expected one of {', '.join(allowed)})")
        if problems:
            raise ConfigError(problems)
        kinds = {n: o.kind for n, o in overrides.items() if o.kind}
        ignored = {n for n, o in overrides.items() if o.ignore}
        self.reference = reference
        self.schema = ModelSchema(name, reference, kinds, ignored)
        self.evaluator = WindowEvaluator(self.settings, reference, self.schema.numeric,
                                         self.schema.categorical)
        self.windows = ModelWindows(name, self.evaluator.layout, self.settings.window)
        detectors = ModelDetectors(name, self.settings, reference, self.schema.numeric,
                                   self.schema.categorical)
        self.detectors = detectors if detectors.active else None


def _some(names: list[str], limit: int = 20) -> str:
    """The first `limit` names, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_model_reference(name: str, path: Path) -> Reference:
    """Load model `name`'s reference file; ConfigError (naming key and file) if unusable.

    A reference built for another model is refused: its features would be judged against
    the wrong model's training data without a word.
    """
    try:
        ref = Reference.load(path)
    except ReferenceError as exc:
        raise ConfigError([f"models.{name}.reference: {exc}"]) from None
    if ref.model and ref.model != name:
        raise ConfigError([f"models.{name}.reference: {path}: built for model {ref.model!r}, "
                           f"not {name!r} (build one with --model {name})"])
    return ref


class Monitor:
    """All models of a config; `process` applies one batch of raw messages."""

    def __init__(self, config: Config, references: dict[str, Reference] | None = None,
                 *, labels: bool = False, scale_out: bool | None = None):
        self.config = config
        self.models: dict[str, ModelPipeline] = {}
        self.baselines: dict[str, tuple[ReferenceBuilder, int]] = {}
        references = references or {}
        problems: list[str] = []  # every model is checked, so all mistakes show at once
        for name, m in config.models.items():
            if name in references:
                self.models[name] = ModelPipeline(name, config, references[name])
            elif m.reference is not None:
                path = m.reference if m.reference.is_absolute() else config.base_dir / m.reference
                try:
                    ref = load_model_reference(name, path)
                    self.models[name] = ModelPipeline(name, config, ref,
                                                      origin=f"the reference {path}")
                except ConfigError as exc:
                    problems += [f"{config.source}: {line}" for line in exc.lines]
            else:
                kinds = {n: o.kind for n, o in m.features.items() if o.kind}
                self.baselines[name] = (ReferenceBuilder(name, config.defaults.profile, kinds),
                                        m.baseline.events)
        if problems:
            raise ConfigError(problems)
        self.decoder = Decoder({n: p.schema for n, p in self.models.items()}, config.decode)
        self.decoder.pending = set(self.baselines)
        self.policy = AlertPolicy({n: model_settings(config, n).alerting for n in config.models})
        self.newest_event: dict[str, float] = {}  # newest event time per model (epoch s)
        # per model: type violations of rejected events not yet given to a kept event
        # (the decoder's `carry`: they go to the model's next kept event, in a later batch)
        self.violations: dict[str, np.ndarray] = {}
        # Performance monitoring (label join) runs when labels can arrive: a labels topic,
        # `replay --labels`, or a model with a `performance` section.
        self.performance: PerformanceStage | None = None
        self.retrain: RetrainPolicy | None = None
        if labels or performance_enabled(config):
            self.performance = PerformanceStage(config, self.policy)
            self.retrain = RetrainPolicy({n: performance_settings(config, n).retrain
                                          for n in config.models})
            for name, pipe in self.models.items():
                self.performance.add_model(name, pipe.reference)
                self._skip_outcomes(name, pipe)
            self.decoder.outcomes = True
        self.scale_out = config.scale_out.enabled if scale_out is None else scale_out
        if self.scale_out:
            self._hold_windows()

    def process(self, messages: Sequence[bytes], positions: Sequence[int]) -> BatchResult:
        """Apply one batch. What comes out (window reports, alerts, detector alarms,
        dead letters) does not depend on where the stream is cut into batches: each
        model's window closes and detector blocks are judged in event order (a block
        ending at the event that closes a window is judged first), models interleaved
        by the position of the event that triggered each, rejects by position."""
        decoded = self.decoder.decode(messages, positions)
        result = BatchResult(messages=len(messages), rejects=decoded.rejects)
        if decoded.pending:
            self._collect_baselines(decoded, result)
        steps: list[list[tuple]] = []   # per model: (position, order, index, kind, ...)
        for order, (model, batch) in enumerate(decoded.models.items()):
            pipe = self.models[model]
            held = self.violations.pop(model, None)
            if held is not None and len(batch):     # for the first kept event
                if batch.violation_rows is None:
                    batch.violation_rows = np.zeros((len(batch), batch.n_features), np.int64)
                batch.violation_rows[0] += held
            closed, late = pipe.windows.add(batch)
            closed_at = pipe.windows.closed_at
            ts = np.delete(batch.ts, late) if late.size else batch.ts  # accepted events only
            if ts.size and not np.isnan(ts).all():
                self.newest_event[model] = max(self.newest_event.get(model, -np.inf),
                                               float(np.nanmax(ts)))
            result.events[model] += len(batch) - late.size
            future = set(pipe.windows.future.tolist()) if late.size else ()
            if self.performance is not None and batch.outcomes is not None:
                self._join_predictions(model, batch, late, result)
            for i in late:
                if np.isnan(batch.ts[i]):
                    reason, detail = BAD_TIMESTAMP, "ts: required for event-time windows"
                elif i in future:
                    reason, detail = FUTURE, ("ts: more than window.max_future ahead of the "
                                              "wall clock or of the stream")
                else:
                    reason, detail = LATE, ("event time behind the watermark by more than "
                                            "allowed_lateness")
                result.rejects.append(Reject(int(batch.positions[i]), reason, batch.raw[i],
                                             model=model, detail=detail))
            own = [] if pipe.detectors is None else [
                (int(batch.positions[at]), order, at, 0, pipe, alarms)
                for at, alarms in self._detect(pipe, batch, late, result)]
            own += [(int(batch.positions[at]), order, at, 1, pipe, window)
                    for at, window in zip(closed_at.tolist(), closed, strict=True)]
            # event order within the model: by batch index, a block before the windows
            # closing at the same event (the sort is stable: windows stay oldest first)
            own.sort(key=lambda s: (s[2], s[3]))
            steps.append(own)
        # models interleaved by the position of each step's event; a merge never
        # reorders one model's steps, whatever the positions
        for _, _, _, kind, pipe, action in heapq.merge(*steps, key=lambda s: (s[0], s[1])):
            if kind == 0:
                self._judge_alarms(pipe, action, result)
            else:
                self._close(pipe, [action], result)
        for model, rows in decoded.carry.items():
            self.violations[model] = self.violations.get(model, 0) + rows
        if len(result.rejects) > 1:     # decoder rejects and late ones, in input order
            result.rejects.sort(key=lambda r: r.position)
        return result

    def checkpoint(self) -> Any:
        """The monitor's mutable state, so a batch that raised can be rolled back.

        Windows, alert states and event times are deep-copied (small fixed-size arrays:
        tens of microseconds); references, schemas and settings are shared, not copied;
        baseline builders only grow, so their row count is enough to undo a batch. Join
        buffers (up to `max_predictions` each) are not copied: each starts an undo
        journal (`JoinBuffer.begin`), so the checkpoint costs the batch, not the buffer.
        """
        memo: dict[int, Any] = {id(self.config): self.config}
        for p in self.models.values():
            for shared in (p.reference, p.schema, p.evaluator, p.settings, p.windows.layout,
                           p.windows.window):
                memo[id(shared)] = shared
            if p.detectors is not None:  # derived from the reference, never changed
                memo[id(p.detectors.layout)] = p.detectors.layout
        # the last window's feature reports per model (the policy's; about 900 objects
        # for 25 features): replaced by the next window's, never changed in place, so
        # shared. With the layout above: 1.2 ms -> 0.4 ms a checkpoint (benchmark's
        # 25 features), about 0.08 us an event less in `run`
        for feats in self.policy.last_features.values():
            memo[id(feats)] = feats
        journals = []
        if self.performance is not None:
            for mp in self.performance.models.values():
                memo[id(mp.buffer)] = mp.buffer
                journals.append((mp.buffer, mp.buffer.begin()))
        # the performance stage shares the policy: one deepcopy keeps them together
        state = copy.deepcopy((self.models, self.policy, self.newest_event, self.performance,
                               self.violations), memo)
        builders = {n: (b, target, b.rows, set(b.columns))
                    for n, (b, target) in self.baselines.items()}
        return state, builders, journals

    def rollback(self, checkpoint: Any) -> None:
        """Back to the state of `checkpoint` (taken by `checkpoint()`; usable once)."""
        (self.models, self.policy, self.newest_event, self.performance, self.violations), \
            builders, journals = checkpoint
        for buffer, token in journals:
            buffer.rollback(token)
        for name, (builder, target, rows, columns) in builders.items():
            for col in [c for c in builder.columns if c not in columns]:
                del builder.columns[col]
            for values in (*builder.columns.values(), builder.predictions, builder.labels):
                del values[rows:]
            builder.rows = rows
            self.baselines[name] = (builder, target)
        self.decoder.schemas = {n: p.schema for n, p in self.models.items()}
        self.decoder.pending = set(self.baselines)

    def snapshot(self, model: str) -> bytes:
        """Everything known about `model` as versioned bytes (`state.py`)."""
        from stream_monitor.kafka.state import snapshot
        return snapshot(self, model)

    def restore(self, model: str, data: bytes) -> None:
        """Put a `snapshot` of `model` back (into a Monitor built from the same config);
        `state.StateError` if the bytes are corrupt, of another version or layout."""
        from stream_monitor.kafka.state import restore
        restore(self, model, data)

    def process_labels(self, messages: Sequence[bytes], positions: Sequence[int]) -> BatchResult:
        """Apply a batch of label events (the labels topic, or label lines of a file)."""
        result = BatchResult(messages=len(messages))
        if self.performance is None:
            raise ValueError("label events need performance monitoring (topics.labels)")
        d = self.config.decode
        events, result.rejects = decode_labels(messages, positions, d.fields, d.default_model)
        models = set(map(attrgetter("model"), events))
        closed, unknown = self.performance.labels(events, models)
        counted = {next(iter(models)): len(events)} if len(models) == 1 else Counter(
            map(attrgetter("model"), events))
        for model, n in counted.items():
            if model in self.performance.models:
                result.labels[model] += n
        result.unjoined[LABEL_UNKNOWN_MODEL] += sum(unknown.values())
        for model, windows in closed.items():
            self._close_performance(model, windows, result)
        return result

    def flush(self) -> BatchResult:
        """Close every open window (end of input)."""
        result = BatchResult()
        for pipe in self.models.values():
            if not pipe.windows.hold:    # scale-out: partials are taken, not closed here
                self._close(pipe, pipe.windows.flush(), result)
        if self.performance is not None:
            for model, mp in self.performance.models.items():
                self._close_performance(model, mp.flush(), result)
        return result

    # -- scale-out (kafka/partials.py): partial windows here, merged and judged elsewhere --

    def _hold_windows(self) -> None:
        """Scale-out needs event-time windows and a reference file for every model: count
        windows of a shared stream mean nothing across instances, and a reference learned
        per instance from its own baseline would make partials unmergeable."""
        problems = []
        for name in self.config.models:
            if name in self.baselines:
                problems.append(f"models.{name}.reference: scale_out.enabled needs a "
                                f"reference file (a baseline would differ per instance)")
            elif self.models[name].windows.window.seconds is None:
                problems.append(f"models.{name}.window: scale_out.enabled needs event-time "
                                f"windows (window.seconds), count windows are per instance")
        if problems:
            raise ConfigError([f"{self.config.source}: {p}" for p in problems])
        for pipe in self.models.values():
            pipe.windows.hold = True

    def take_partials(self) -> dict[str, list[ClosedWindow]]:
        """Scale-out: per model, the partial event-time windows accumulated since the last
        take (the delta to publish), oldest first; local windows start empty again."""
        out = {}
        for name, pipe in self.models.items():
            windows = pipe.windows.take_open()
            if windows:
                out[name] = windows
        return out

    def watermarks(self) -> dict[str, float]:
        """Per model, this monitor's event-time watermark (-inf before any event)."""
        return {name: pipe.windows.watermark for name, pipe in self.models.items()}

    def close_windows(self, model: str, windows: list[ClosedWindow]) -> BatchResult:
        """Judge windows closed elsewhere (merged partials): evaluate them and run the
        alert policy and retraining triggers, once, in the order given."""
        result = BatchResult()
        self._close(self.models[model], windows, result)
        return result

    def judge_alarms(self, model: str, alarms: list[tuple[str, list[tuple], dict[str, Any]]]
                     ) -> BatchResult:
        """Scale-out: detector alarms of the instances, judged by this model's alert
        policy (the one that sees the merged windows), in the order given."""
        result = BatchResult()
        for _, found, window in alarms:
            result.alerts += self.policy.detections(model, found, window)
        return result

    def _close(self, pipe: ModelPipeline, closed: list[ClosedWindow], result: BatchResult) -> None:
        for window in closed:
            report = pipe.evaluator.evaluate(window)
            result.reports.append(report)
            alerts = self.policy.evaluate(report)
            result.alerts += alerts
            if self.retrain is not None and alerts:
                result.retrain += self.retrain.on_alerts(
                    alerts, lambda m: fault_state(self.policy, m)[0])

    def _join_predictions(self, model: str, batch, late: np.ndarray, result: BatchResult) -> None:
        """Predictions of a decoded batch into the model's join buffer (late ones excluded)."""
        outcomes, positions, ts, raw = batch.outcomes, batch.positions, batch.ts, batch.raw
        if late.size:
            keep = np.ones(len(batch), bool)
            keep[late] = False
            idx = np.flatnonzero(keep).tolist()
            outcomes = {k: [v[i] for i in idx] for k, v in outcome_lists(batch).items()}
            positions, ts = positions[keep], ts[keep]
            raw = [raw[i] for i in idx]
        # what the decoder gathered while the values were in the CPU cache (a pass over
        # 10,000 Python objects afterwards costs as much as the join's numpy work)
        facts = None if late.size else batch.outcome_facts
        floats = None if facts is None else facts[1]
        # every prediction a float: the decoder's numeric column serves (no list -> array)
        values = None
        if not floats and "prediction" not in outcomes:  # the typed path's column: a list
            outcomes = outcome_lists(batch)
        if floats is None:
            preds = outcomes["prediction"]
            floats = bool(preds) and set(map(type, preds)) == {float}
        if floats:
            values = batch.prediction
            if values is None or values.dtype != np.float64 or values.size != batch.ts.size:
                values = np.array(outcomes["prediction"], np.float64)
            elif late.size:
                values = values[keep]
        if "scores" in self.models[model].schema.outcome_skip:
            outcomes = scores_from_raw(outcomes, raw, every=values is None,
                                       field=self.config.decode.fields.scores)
        estimates, closed = self.performance.observe(model, positions, ts, outcomes, values,
                                                     None if facts is None else facts[0])
        result.performance += estimates
        batch.outcomes = None  # its 10,000s of values are freed now, while in the CPU cache
        self._close_performance(model, closed, result)

    def _close_performance(self, model: str, closed: list, result: BatchResult) -> None:
        if not closed:
            return
        reports, alerts, states = self.performance.close(model, closed)
        result.performance += reports
        result.alerts += alerts
        faults = fault_state(self.policy, model)[0]
        for st in states:
            result.retrain += self.retrain.on_window(st["report"], st["findings"], faults)

    def _detect(self, pipe: ModelPipeline, batch, late: np.ndarray, result: BatchResult
                ) -> list[tuple[int, list[Detection]]]:
        """Sequential detectors over the batch's counted events (late ones are rejects);
        returns each alarming block's alarms with the batch index of the block's last
        event, for `process` to judge in event order with the window closes."""
        x, codes, pos, ts = batch.numeric, batch.categorical, batch.positions, batch.ts
        slots = batch.slots     # the engine's bins of these values: not binned twice
        counted = None
        if late.size:
            keep = np.ones(len(batch), bool)
            keep[late] = False
            counted = np.flatnonzero(keep)      # batch index of each counted event
            x, codes, pos, ts = x[keep], codes[keep], pos[keep], ts[keep]
            slots = None if slots is None else slots[keep]
        det = pipe.detectors
        blocks, filled = det.blocks, det.filled
        found = det.update(x, codes, pos, ts, slots)
        by_block: dict[int, list[Detection]] = {}
        for d in found:
            by_block.setdefault(d.window["block"], []).append(d)
        if det.blocks != blocks:
            result.block_stats[pipe.name] = dict(det.last)
        out = []
        for block, group in by_block.items():   # one block's alarms are judged together
            end = (block - blocks + 1) * det.layout.block - filled - 1  # counted index
            out.append((end if counted is None else int(counted[end]), group))
        return out

    def _judge_alarms(self, pipe: ModelPipeline, found: list[Detection],
                      result: BatchResult) -> None:
        """One block's alarms, judged together: a feature's first in the block (location
        before shape)."""
        result.detections += found
        group: list[Detection] = []
        for d in found:
            if all(g.feature != d.feature for g in group):
                group.append(d)
        alarms = [(d.feature, d.method, d.value, d.threshold) for d in group]
        if self.scale_out:  # judged where the model's windows are (kafka/partials.py)
            result.alarms.append((pipe.name, alarms, group[0].window))
        else:
            result.alerts += self.policy.detections(pipe.name, alarms, group[0].window)

    def _collect_baselines(self, decoded: DecodedBatch, result: BatchResult) -> None:
        fields = self.config.decode.fields
        for model, group in decoded.pending.items():
            builder, target = self.baselines[model]
            leftover = []
            for pos, ev, raw in group:
                if builder.rows >= target:
                    leftover.append((pos, raw))
                    continue
                feats = ev.get(fields.features)
                if type(feats) is not dict:
                    result.rejects.append(Reject(pos, BAD_FEATURES, raw, model=model,
                                                 detail=f"'{fields.features}' is not an object"))
                    continue
                builder.add(feats, ev.get(fields.prediction), ev.get(fields.label))
                result.events[model] += 1
            if builder.rows >= target:
                self._activate(model, builder)
                if leftover:
                    rest = self.process([r for _, r in leftover], [p for p, _ in leftover])
                    result.extend(rest)
                    result.messages -= rest.messages  # already counted once

    def _activate(self, model: str, builder: ReferenceBuilder,
                  reference: Reference | None = None) -> None:
        reference = reference or builder.build(source="baseline")
        pipe = ModelPipeline(model, self.config, reference)
        self.models[model] = pipe
        del self.baselines[model]
        self.decoder.schemas[model] = pipe.schema
        self.decoder.pending.discard(model)
        if self.performance is not None:
            self.performance.add_model(model, reference)
            self._skip_outcomes(model, pipe)

    def _skip_outcomes(self, model: str, pipe: ModelPipeline) -> None:
        """The segment object is decoded only for a model that slices by segment; the
        scores are not decoded for a model whose predictions are numbers (they carry the
        score): `join.scores_from_raw` reads them for the few events that need them."""
        skip = set()
        if not performance_settings(self.config, model).segments.fields:
            skip.add("segment")
        if pipe.schema.prediction is not None and pipe.schema.prediction.kind == "numeric":
            skip.add("scores")
        if skip:
            pipe.schema.outcome_skip = frozenset(skip)
