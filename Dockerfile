# stream-monitor container image: `docker build -t stream-monitor .`
#
# Two stages: `build` installs the package and its dependencies (binary wheels only, so
# no compiler is needed or present anywhere) into a virtualenv; the final image is the
# same pinned slim Python with only that virtualenv copied in, run as an unprivileged
# user. Ports and paths are the documented ones (README "Deploy"; tests/test_deploy.py
# checks that the Dockerfile, docker-compose.yml and deploy/kubernetes agree).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/stream-monitor
WORKDIR /src
COPY pyproject.toml README.md ./
COPY stream_monitor ./stream_monitor
# Our own package is pure Python: build its wheel, then install it with every dependency
# from binary wheels only (--only-binary: a missing wheel fails the build instead of
# compiling from source). Then drop what production never runs, the libraries' own test
# suites (about 50 MB of scipy and numpy) and pip, and check that what is left imports.
RUN /opt/stream-monitor/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/stream-monitor/bin/pip install --only-binary=:all: /wheels/stream_monitor-*.whl \
 && find /opt/stream-monitor/lib -type d -name tests -prune -exec rm -rf {} + \
 && /opt/stream-monitor/bin/python -m pip uninstall --yes --quiet pip \
 && /opt/stream-monitor/bin/python -c "import scipy.stats, river, stream_monitor.kafka.runtime" \
 && /opt/stream-monitor/bin/stream-monitor --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="stream-monitor" \
      org.opencontainers.image.description="Kafka-native drift and performance monitor for ML models" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 stream-monitor \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin stream-monitor
COPY --from=build /opt/stream-monitor /opt/stream-monitor
ENV PATH=/opt/stream-monitor/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /tmp
# /metrics, /healthz and /readyz (http.port in the config; 9108 by default)
EXPOSE 9108
# Liveness only: /healthz answers while the process runs. Readiness (/readyz: partitions
# assigned, broker answering) is the orchestrator's business (compose healthcheck,
# Kubernetes readinessProbe). Python's urllib, since the slim image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=3)"]
ENTRYPOINT ["stream-monitor"]
CMD ["run", "--config", "/etc/stream-monitor/config.yaml"]
