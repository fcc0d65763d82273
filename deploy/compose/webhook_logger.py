"""Alertmanager webhook receiver for the compose stack: logs each notification it gets.

One line per alert in each notification POSTed to any path (the path names the
Alertmanager receiver: /pager, /ml-team), so `docker compose logs -f webhook-logger`
shows alerts arriving:

    2026-11-23T10:00:00Z /pager firing FeatureDrift severity=critical model=churn feature=f01 ...

Standard library only. `GET /healthz` answers 200 (the compose healthcheck).
Usage: python webhook_logger.py [--host 0.0.0.0] [--port 5001]
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LABELS_FIRST = ("severity", "model", "feature", "check")


def format_notification(path: str, body: dict) -> list[str]:
    """The log lines of one Alertmanager webhook notification (version 4 payload)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    lines = []
    for alert in body.get("alerts", []):
        labels = dict(alert.get("labels", {}))
        name = labels.pop("alertname", "?")
        ordered = [k for k in LABELS_FIRST if k in labels] + sorted(
            k for k in labels if k not in LABELS_FIRST)
        text = " ".join(f"{k}={labels[k]}" for k in ordered)
        summary = alert.get("annotations", {}).get("summary", "")
        lines.append(f"{now} {path} {alert.get('status', '?')} {name} {text}"
                     + (f" | {summary}" if summary else ""))
    return lines


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        ok = self.path == "/healthz"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"ok\n" if ok else b"POST Alertmanager notifications here\n")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
            lines = format_notification(self.path, body)
        except (ValueError, AttributeError) as exc:
            self.send_response(400)
            self.end_headers()
            print(f"{self.path}: not an Alertmanager notification ({exc})", flush=True)
            return
        for line in lines:
            print(line, flush=True)
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (quiet access log)
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=5001)
    args = ap.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    # PID 1 in a container: without a handler SIGTERM is ignored and `docker stop` waits
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"webhook-logger listening on {args.host}:{server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
