# Two entry points matter: `make run` and `make test`. Both build everything they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
RUNTIME_STAMP := $(VENV)/.runtime-stamp
PG_TEST_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
# `make lock` resolves for the image's platform (Debian 12, CPython 3.11, x86_64); the
# hashes cover every published file of each pinned version.
LOCK_FLAGS := --generate-hashes --no-header --python-version 3.11 --python-platform x86_64-manylinux_2_31

.PHONY: run test venv lock generate check-generated lint typecheck proto-lint check-deploy migrate bench clean gateway breaking

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Installs come from the hash-locked files (pip refuses any file whose sha256 differs):
# `make run` the runtime set only, `make test` runtime + dev.
$(RUNTIME_STAMP): requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(RUNTIME_STAMP)

$(STAMP): requirements-dev.lock requirements.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP) $(RUNTIME_STAMP)

# Re-resolve requirements*.lock after changing a pin in pyproject.toml.
lock: $(BIN)/python
	$(BIN)/pip install --quiet uv==0.9.5
	$(BIN)/uv pip compile pyproject.toml $(LOCK_FLAGS) -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra dev -c requirements.lock $(LOCK_FLAGS) \
		-o requirements-dev.lock

venv: $(STAMP)

generate: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python tools/generate.py

# Regenerates and fails when the committed generated/ or third_party/ differ.
check-generated: generate
	git diff --exit-code --stat -- generated third_party
	@test -z "$$(git status --porcelain -- generated third_party)" || \
		(git status --porcelain -- generated third_party; echo "generated/ is stale: run make generate"; exit 1)

proto-lint: generate
	$(BIN)/buf lint generated/payments_descriptor_set.binpb --config buf.yaml \
		--path payments/v1 --path orders/v1 --path auth/v1 --path inventory/v1

# buf breaking (FILE + WIRE_JSON, buf.yaml) of protos/ against the descriptor set committed
# on BREAKING_AGAINST (main; origin/main in a clone without a local main branch).
BREAKING_AGAINST ?= main
breaking: generate
	@ref=$$(git rev-parse --verify -q "$(BREAKING_AGAINST)^{commit}" || \
		git rev-parse --verify -q "origin/$(BREAKING_AGAINST)^{commit}") || \
		{ echo "buf breaking: no $(BREAKING_AGAINST) or origin/$(BREAKING_AGAINST) to compare with (set BREAKING_AGAINST=<git ref>)"; exit 1; }; \
	git show "$$ref:generated/payments_descriptor_set.binpb" > $(VENV)/breaking-against.binpb && \
	$(BIN)/buf breaking generated/payments_descriptor_set.binpb --config buf.yaml \
		--against $(VENV)/breaking-against.binpb \
		--path payments/v1 --path orders/v1 --path auth/v1 --path inventory/v1 && \
	echo "buf breaking: no breaking change against $(BREAKING_AGAINST) ($$ref)"

lint: $(STAMP)
	$(BIN)/ruff check payment_grpc tests bench tools migrations
	$(BIN)/ruff format --check payment_grpc tests bench tools migrations

typecheck: $(STAMP)
	$(BIN)/mypy

# generated/ is committed (make test checks it is fresh): running needs no dev tools.
migrate: $(RUNTIME_STAMP)
	$(BIN)/payment-grpc migrate

# Metrics on for a local run: http://127.0.0.1:9464/metrics (METRICS_PORT=... moves them).
run: $(RUNTIME_STAMP)
	METRICS_PORT=$${METRICS_PORT-9464} $(BIN)/payment-grpc serve

# Envoy (HTTP/JSON on :8080) in front of a service already running on :8009 (make run).
gateway: generate
	$(BIN)/python tools/gateway.py

check-deploy: $(STAMP)
	$(BIN)/python tools/check_deploy.py

test: check-generated proto-lint breaking lint typecheck check-deploy
	PG_TEST_URL=$(PG_TEST_URL) $(BIN)/pytest -q -p no:cacheprovider

bench: generate
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) payments.db payments.db-* .data
