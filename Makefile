# Entrepot: every entry point creates or reuses .venv from requirements.lock first.
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The TypeScript client (prerequisites below are expanded where they are read: define first).
TS := clients/typescript
TS_DEPS := $(TS)/node_modules/.package-lock.json

.PHONY: venv run test check lint gen gen-check buf-lint buf-breaking test-fast bench bench-smoke bench-aged soak clean \
	ts ts-deps ts-gen ts-gen-check ts-build browser haproxy

venv:
	@bash scripts/venv.sh

## Start everything (embedded PostgreSQL + Temporal dev server unless DATABASE_URL / TEMPORAL_ADDRESS are set).
## Flags go through ARGS: make run ARGS="--listen 127.0.0.1:50052 --metrics-port 0"
run: venv
	$(BIN)/entrepot dev $(ARGS)

## The test command: static checks, contracts, then the whole test suite.
test: venv check ts browser haproxy
	$(BIN)/pytest -q tests

check: venv gen-check buf-lint lint

lint: venv
	$(BIN)/ruff check server domain clients/python tests bench scripts migrations
	$(BIN)/ruff format --check server domain clients/python tests bench scripts migrations
	$(BIN)/mypy
	$(BIN)/lint-imports

## Regenerate generated/python and clients/typescript/src/gen from proto/.
gen: venv $(TS_DEPS)
	$(PY) scripts/gen_protos.py
	$(PY) scripts/gen_ts.py

## Fail when generated/python is stale.
gen-check: venv
	$(PY) scripts/gen_protos.py --check

buf-lint: venv
	$(BIN)/buf format --diff --exit-code proto
	$(BIN)/buf lint

## TypeScript client (clients/typescript): node deps from package-lock.json only (npm ci),
## generated code from proto/ with buf + the local protoc-gen-es, compiled with tsc.
## The interop and BFF tests (tests/e2e/test_typescript_interop.py, test_bff_browser.py) need node and these deps.

$(TS_DEPS): $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci

ts-deps: $(TS_DEPS)

ts-gen: venv $(TS_DEPS)
	$(PY) scripts/gen_ts.py

## Fail when clients/typescript/src/gen is stale.
ts-gen-check: venv $(TS_DEPS)
	$(PY) scripts/gen_ts.py --check

ts-build: $(TS_DEPS)
	rm -rf $(TS)/dist
	$(TS)/node_modules/.bin/tsc -p $(TS)

ts: ts-gen-check ts-build

## Headless Chromium for tests/e2e/test_bff_browser.py: Debian's `chromium` (apt-get, as root;
## otherwise one line says what to install), driven by playwright-core from package-lock.json.
browser: $(TS_DEPS)
	@bash scripts/ensure-debian-package.sh chromium $${CHROMIUM_PATH:-/usr/bin/chromium} >/dev/null

## HAProxy from Debian for R10 (tests/reliability/test_rolling_restart.py): apt-get install
## when missing (as root), or one line saying what to install.
haproxy:
	@bash scripts/ensure-debian-package.sh haproxy /usr/sbin/haproxy >/dev/null

## Guard contracts already landed: compare proto/ with the commit named in .ci/contract-baseline
## (moved forward deliberately when a landing is accepted).
buf-breaking: venv
	@base=$$(cat .ci/contract-baseline 2>/dev/null || true); \
	if [ -n "$$base" ] && git cat-file -e "$$base" 2>/dev/null; then \
	  $(BIN)/buf breaking --against ".git#ref=$$base" && echo "buf breaking: no breaking change since $$base"; \
	else echo "buf breaking: no landed contract baseline yet"; fi

test-fast: venv
	$(BIN)/pytest -q tests/unit

bench: venv
	$(PY) -m bench.run

bench-smoke: venv
	$(PY) -m bench.run --smoke

bench-aged: venv
	$(PY) -m bench.run --aged

## Long forms of R1..R13 (CI runs the short forms of the same tests).
soak: venv
	ENTREPOT_SOAK=long ENTREPOT_SOAK_SECONDS=60 $(BIN)/pytest -q tests/reliability \
	  tests/integration/test_auth_matrix.py tests/integration/test_auth_rs.py \
	  tests/integration/test_inventory_api.py $(wildcard tests/integration/test_refund*.py) \
	  $(wildcard tests/integration/test_sync_stock.py tests/integration/test_watch_stock.py) \
	  tests/integration/test_event_relay.py

clean:
	rm -rf $(VENV) .entrepot
