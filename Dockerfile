# syntax=docker/dockerfile:1
# payment-grpc image.  Build from the repo root:  docker build -t payment-grpc:0.1.0 .
# generated/ (stubs + descriptor set) is committed, so the build needs no protoc.
# Pin the base by digest in CI (python:3.11-slim@sha256:...) for reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim

# ---- build: a self-contained virtualenv in /opt/venv --------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependency layer first (pins come from pyproject.toml), cached until pyproject changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install --no-cache-dir -r /tmp/requirements.txt
COPY README.md ./
COPY payment_grpc ./payment_grpc
COPY generated ./generated
COPY migrations ./migrations
RUN pip install --no-cache-dir . \
 && payment-grpc --help > /dev/null

# ---- runtime ------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
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
EXPOSE 8009
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["payment-grpc", "probe"]
ENTRYPOINT ["payment-grpc"]
CMD ["serve"]
