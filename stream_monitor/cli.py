"""Command line: `stream-monitor run | replay | reference build | check-config | demo | diagnose`.

Every error a user can cause is one line on stderr naming what and where, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import orjson
from pydantic import ValidationError

from .config import ConfigError, FieldMapping, ProfileConfig, load_config
from .reference import ReferenceError, build_reference


class UsageError(Exception):
    """A user mistake outside the config (missing file, bad argument)."""


def _cmd_check_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    from .pipeline import Monitor
    Monitor(cfg)  # also loads every reference, so a bad path fails here, not at run time
    print(f"{args.config}: ok ({len(cfg.models)} model(s): {', '.join(cfg.models)})")
    return 0


def _cmd_reference_build(args: argparse.Namespace) -> int:
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
    from .replay import replay
    cfg = load_config(args.config)
    path = Path(args.input)
    if not path.exists():
        raise UsageError(f"{path}: input file not found")
    summary = replay(cfg, path, Path(args.out), progress=False if args.quiet else None)
    print(summary.as_text())
    print(f"wrote {args.out}/windows.jsonl, alerts.jsonl, rejects.jsonl")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from .policy import diagnose
    path = Path(args.input)
    if path.is_dir():
        path = path / "windows.jsonl"
    if not path.exists():
        raise UsageError(f"{path}: windows file not found (give a replay output directory)")
    last: dict[str, dict] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            report = orjson.loads(line)
            last[report["model"]] = report
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise UsageError(f"{path}:{lineno}: not a window report") from None
    for model, report in sorted(last.items()):
        win = report["window"]
        print(f"{model}: window {win.get('start')} .. {win.get('end')} ({win['events']} events)")
        d = diagnose(report)
        if d is None:
            print("  no drift or data-quality finding")
            continue
        print(f"  root cause: {d['root_cause']} — {d['explanation']}")
        for name in d["top_features"]:
            f = report["features"].get(name)
            if f:
                print(f"  - {name}: {f['method']} {f['value']} ({f['severity']})")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from . import synthetic
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


# Commands that need neither Kafka nor Prometheus: they start without importing the
# runtime (confluent-kafka, prometheus-client), a large share of `replay`'s start-up.
LOCAL_COMMANDS = frozenset({"replay", "reference", "check-config", "sample", "diagnose"})


def build_parser(with_runtime: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream-monitor", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-config", help="validate a config file (and its references)")
    c.add_argument("config")
    c.set_defaults(func=_cmd_check_config)

    ref = sub.add_parser("reference", help="reference profiles")
    rsub = ref.add_subparsers(dest="action", required=True)
    b = rsub.add_parser("build", help="build a model's reference from training data")
    b.add_argument("--config", help="config (for field mapping, kinds and profile settings)")
    b.add_argument("--model", required=True)
    b.add_argument("--input", required=True, help="JSONL of events or CSV of features")
    b.add_argument("--out", required=True)
    b.add_argument("--bins", type=int, help="quantile bins per numeric feature (default 50)")
    b.add_argument("--max-categories", type=int, help="categories kept per feature (1000)")
    b.set_defaults(func=_cmd_reference_build)

    r = sub.add_parser("replay", help="run the engine over a JSONL file of events")
    r.add_argument("--config", required=True)
    r.add_argument("--input", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_replay)

    s = sub.add_parser("sample", help="write a synthetic training file and a drifting stream")
    s.add_argument("--out", default="samples")
    s.add_argument("--train", type=int, default=100_000)
    s.add_argument("--events", type=int, default=200_000)
    s.add_argument("--drift-at", type=int, default=100_000, help="0 for no drift")
    s.set_defaults(func=_cmd_sample)

    d = sub.add_parser("diagnose", help="explain the latest window of each model")
    d.add_argument("input", help="replay output directory or windows.jsonl")
    d.set_defaults(func=_cmd_diagnose)

    import importlib.util
    if with_runtime and importlib.util.find_spec("stream_monitor.runtime") is not None:
        from . import runtime
        runtime.add_commands(sub)
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
    except (ReferenceError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
