# Two entry points matter: `make run` and `make test`. Both build everything they need.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PG_TEST_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: run test venv generate check-generated lint typecheck proto-lint check-deploy migrate bench clean gateway breaking

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

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
		--path payments/v1 --path orders/v1 --path auth/v1

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
		--path payments/v1 --path orders/v1 --path auth/v1 && \
	echo "buf breaking: no breaking change against $(BREAKING_AGAINST) ($$ref)"

lint: $(STAMP)
	$(BIN)/ruff check payment_grpc tests bench tools migrations
	$(BIN)/ruff format --check payment_grpc tests bench tools migrations

typecheck: $(STAMP)
	$(BIN)/mypy

migrate: generate
	$(BIN)/payment-grpc migrate

run: generate
	$(BIN)/payment-grpc serve

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
