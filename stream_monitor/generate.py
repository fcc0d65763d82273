"""`stream-monitor generate`: the demo's synthetic traffic, produced to a Kafka you name.

The traffic generator of the compose stack (docker-compose.yml): inference events for
the demo's models (`churn`, `fraud`) at a steady rate, drifting after a while (a
covariate shift in `churn`, a feature going missing in `fraud`), and nothing else: no
embedded broker, no monitor, no live view. Logs one line at start, one when the drift
starts, one every `--report-every` seconds and one at exit.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time

log = logging.getLogger("stream_monitor.generate")


def _cmd_generate(args: argparse.Namespace) -> int:
    from stream_monitor.demo import MODELS, Traffic  # confluent-kafka only when the command runs

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.rate <= 0:
        raise _usage("--rate: must be > 0")
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    traffic = Traffic(args.bootstrap_servers, args.topic, args.rate, args.drift_after)
    log.info("producing %.0f events/s for %s to %s on %s; drift starts after %.0fs",
             args.rate, ", ".join(MODELS), args.topic, args.bootstrap_servers, args.drift_after)
    traffic.start()
    started = time.monotonic()
    deadline = started + args.duration if args.duration else float("inf")
    drift_logged = False
    next_report = started + args.report_every
    while not done.is_set() and traffic.is_alive():
        now = time.monotonic()
        if now >= deadline:
            break
        if not drift_logged and now - started >= args.drift_after:
            log.info("drift starts now (churn: covariate shift; fraud: a feature goes "
                     "missing); %d events produced", traffic.sent)
            drift_logged = True
        if args.report_every and now >= next_report:
            log.info("%d events produced", traffic.sent)
            next_report += args.report_every
        done.wait(min(0.5, max(0.0, deadline - now)))
    traffic.stop.set()
    traffic.join(15)
    log.info("stopped: %d events produced", traffic.sent)
    return 0


def _usage(message: str) -> Exception:
    from stream_monitor.cli import UsageError
    return UsageError(message)


def add_command(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="produce the demo's synthetic drifting traffic to a Kafka")
    g.add_argument("--bootstrap-servers", required=True, help="Kafka to produce to (HOST:PORT)")
    g.add_argument("--topic", default="inferences", help="inference topic (default: %(default)s)")
    g.add_argument("--rate", type=float, default=1000,
                   help="events/s produced, all models (default: %(default)s)")
    g.add_argument("--drift-after", type=float, default=180,
                   help="seconds before drift starts (default: %(default)s)")
    g.add_argument("--duration", type=float, default=0,
                   help="seconds to run, 0 until stopped (default: %(default)s)")
    g.add_argument("--report-every", type=float, default=60,
                   help="seconds between progress lines, 0 for none (default: %(default)s)")
    g.set_defaults(func=_cmd_generate)
