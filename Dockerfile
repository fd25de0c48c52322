# syntax=docker/dockerfile:1
# payment-grpc image.  Build from the repo root:
#   docker build --build-arg VERSION=0.1.0 --build-arg REVISION=$(git rev-parse HEAD) \
#       -t payment-grpc:0.1.0 .
# generated/ (stubs + descriptor set) is committed, so the build needs no protoc.
#
# The base is pinned by digest (the multi-architecture index of python:3.11.14-slim-bookworm,
# as published on Docker Hub). To move to a newer patch release:
#   docker buildx imagetools inspect python:3.11-slim-bookworm   # prints "Digest: sha256:..."
# put the version and that digest here, rebuild, run the tests against the image.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

# ---- build: a self-contained virtualenv in /opt/venv --------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependency layer first: the runtime set only, exactly the versions and files (sha256)
# of requirements.lock (`make lock` regenerates it from pyproject.toml).
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY payment_grpc ./payment_grpc
COPY generated ./generated
COPY migrations ./migrations
RUN pip install --no-cache-dir --no-deps . \
 && payment-grpc --help > /dev/null

# ---- runtime ------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG PYTHON_IMAGE
LABEL org.opencontainers.image.title="payment-grpc" \
      org.opencontainers.image.description="Internal payment service over gRPC" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://git.example.internal/payments/payment-grpc" \
      org.opencontainers.image.vendor="payments team" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8009 \
    WORKERS=auto \
    DATA_DIR=/var/lib/payment-grpc/data \
    LOG_FORMAT=json
RUN groupadd --system --gid 10001 app \
 && useradd --system --uid 10001 --gid app --home-dir /var/lib/payment-grpc --no-create-home \
        --shell /usr/sbin/nologin app \
 && mkdir -p /var/lib/payment-grpc/data \
 && chown -R app:app /var/lib/payment-grpc
COPY --from=build /opt/venv /opt/venv
# For the Envoy gateway: its init container copies this file (k8s/envoy-deployment.yaml).
COPY --chmod=0644 generated/payments_descriptor_set.binpb /opt/payment-grpc/payments_descriptor_set.binpb
# Default SQLite URL (./payments.db) resolves here; production sets DATABASE_URL.
WORKDIR /var/lib/payment-grpc
USER 10001:10001
# 8009 gRPC; 9464 Prometheus metrics when METRICS_PORT is set (k8s sets it).
EXPOSE 8009 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["payment-grpc", "probe"]
ENTRYPOINT ["payment-grpc"]
CMD ["serve"]
