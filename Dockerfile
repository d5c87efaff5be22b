# recsvc container image.
#
#   docker build -t recsvc .                          # the service (default target: runtime)
#   docker run --rm -p 127.0.0.1:8080:8080 -e RECSVC_INSECURE=1 recsvc demo   # zero-setup
#       demo, embedded redis-server, no API keys (published on loopback only)
#   docker run --rm -p 8080:8080 -e RECSVC_REDIS_URL=redis://host:6379/0 \
#       -e RECSVC_API_KEYS=shop:recommend+events:<key> recsvc                 # serve
#
# The container listens on 0.0.0.0 (RECSVC_HOST below), so recsvc refuses to serve
# without API keys (RECSVC_API_KEYS or RECSVC_API_KEYS_FILE) unless RECSVC_INSECURE=1
# says that is meant: see "Threat model" in README.md.
#   docker build --target loadtest -t recsvc-loadtest .   # locust + loadtest/ (see compose)
#
# Same Python as CI (3.11) in every stage; the venv is copied between stages at the
# same path (/opt/venv), so its interpreter links to /usr/local/bin/python3.11 stay valid.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------
# builder: a venv with the dependencies, then the project (non-editable install).
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONUNBUFFERED=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv

WORKDIR /src

# 1. Dependencies only: [project].dependencies read from pyproject.toml with the
#    standard library's tomllib and installed as a requirements file. This layer
#    depends on pyproject.toml alone, so editing the source does not reinstall
#    LightGBM, numpy, llvmlite and the rest. (Every dependency has a manylinux
#    x86_64 wheel for CPython 3.11, so no compiler is needed in this stage.)
COPY pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb")); print("\n".join(p["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt

# 2. The project. README.md is read by the build (pyproject: readme = "README.md").
#    --no-deps: everything it needs is installed above; `pip check` proves it.
COPY README.md ./
COPY features ./features
COPY recsvc ./recsvc
RUN pip install --no-deps . \
    && pip check

# ---------------------------------------------------------------------------------
# loadtest: locust (the project's `loadtest` extra) and loadtest/{runner,locustfile,slo}.py.
# Needs nothing from recsvc itself; runner.py with --host only talks HTTP to a service.
FROM ${PYTHON_IMAGE} AS loadtest

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

COPY pyproject.toml /tmp/pyproject.toml
RUN python -c 'import tomllib; p = tomllib.load(open("/tmp/pyproject.toml", "rb")); print("\n".join(p["project"]["optional-dependencies"]["loadtest"]))' \
        > /tmp/requirements-loadtest.txt \
    && pip install --requirement /tmp/requirements-loadtest.txt \
    && rm /tmp/pyproject.toml /tmp/requirements-loadtest.txt

RUN groupadd --system --gid 10002 locust \
    && useradd --system --uid 10002 --gid locust --home-dir /results --no-create-home \
        --shell /usr/sbin/nologin locust \
    && install -d -o locust -g locust -m 0755 /results

WORKDIR /opt/loadtest
COPY loadtest/runner.py loadtest/locustfile.py loadtest/slo.py ./

USER 10002:10002
ENTRYPOINT ["python", "/opt/loadtest/runner.py"]
CMD ["--help"]

# ---------------------------------------------------------------------------------
# runtime (default target): the venv, libgomp1, a non-root user, /var/lib/recsvc.
FROM ${PYTHON_IMAGE} AS runtime

# libgomp1: the OpenMP runtime lib_lightgbm.so links against; not in the slim image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# RECSVC_DATA_DIR holds the synthetic data (seed/train/demo), the embedded Redis
# files (demo / --embedded) and cache/scorers (lleaves object files); models/ is
# the model registry. Created here and owned by the service user, so named
# volumes mounted on them start out with that ownership.
RUN groupadd --system --gid 10001 recsvc \
    && useradd --system --uid 10001 --gid recsvc --home-dir /var/lib/recsvc --no-create-home \
        --shell /usr/sbin/nologin recsvc \
    && install -d -o recsvc -g recsvc -m 0755 \
        /var/lib/recsvc /var/lib/recsvc/models /var/lib/recsvc/cache

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    VIRTUAL_ENV=/opt/venv \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RECSVC_HOST=0.0.0.0 \
    RECSVC_PORT=8080 \
    RECSVC_DATA_DIR=/var/lib/recsvc \
    RECSVC_MODEL_DIR=/var/lib/recsvc/models

WORKDIR /var/lib/recsvc
USER 10001:10001
EXPOSE 8080

# Liveness only (/healthz); /readyz is for load balancers (it is 503 until item
# data is in memory). No curl in the image: the standard library does it, and a
# non-2xx answer or no answer raises, so the exit code is 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('RECSVC_PORT', '8080'), timeout=3)"]

ENTRYPOINT ["recsvc"]
# Needs RECSVC_REDIS_URL (redis://, rediss://, unix://, redis+cluster://host:port,...)
# and API keys (or RECSVC_INSECURE=1); without them serve stops with a message. `demo` runs everything in the container instead.
CMD ["serve"]
