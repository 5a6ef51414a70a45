# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/vigil/v1/*.proto)
GEN_STAMP := vigil/v1/.generated

.PHONY: run test test-fast bench chaos chaos-short lint typecheck proto install clean prometheus-tools net-tools promcheck

run: $(STAMP) $(GEN_STAMP)
	$(BIN)/vigil up

test: $(STAMP) $(GEN_STAMP) prometheus-tools net-tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(MAKE) promcheck
	$(BIN)/pytest -q

test-fast: $(STAMP) $(GEN_STAMP)
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP) $(GEN_STAMP)
	$(BIN)/python -m bench

# The chaos soak (chaos/): `make chaos DURATION=30m [SEED=N]`; report in chaos/results/.
DURATION ?= 30m
# The 60-90 s soak as a test, alone (`make test` runs it too).
chaos-short: $(STAMP) $(GEN_STAMP) net-tools
	$(BIN)/pytest -q -m soak tests/integration/test_chaos_short.py

chaos: $(STAMP) $(GEN_STAMP) net-tools
	$(BIN)/python -m chaos --duration $(DURATION) $(if $(SEED),--seed $(SEED))

lint: $(STAMP) $(GEN_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) $(GEN_STAMP)
	$(BIN)/mypy

install: $(STAMP)

# Prometheus and promtool (Debian's `prometheus` package) for the rule checks and the
# end-to-end alert test. Installed only when missing; needs root (or sudo). The package's
# service is not started in a container (no init system / policy-rc.d), and the tests run
# their own Prometheus on a free loopback port either way.
prometheus-tools:
	@if command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1; then :; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		echo "installing Debian's prometheus package (prometheus, promtool)"; \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends prometheus; \
	fi

# `ip` and `tc` (Debian's iproute2) for the chaos soak's network namespace, partitions and
# slow network; the soak needs root for them.
net-tools:
	@if command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1; then :; \
	else \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		echo "installing Debian's iproute2 package (ip, tc)"; \
		$$SUDO apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends iproute2; \
	fi

# Prometheus scrape config and alert rules: syntax, and the rules' unit tests.
promcheck: prometheus-tools
	promtool check config deploy/prometheus/prometheus.yml
	promtool check rules deploy/prometheus/rules/*.yml
	promtool test rules deploy/prometheus/tests/*.yml

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]' --config-settings editable_mode=compat
	touch $@

proto: $(GEN_STAMP)

# Generated code is never committed or edited by hand: it comes from here only.
$(GEN_STAMP): $(PROTOS) $(STAMP) tools/protos.py
	$(BIN)/python tools/protos.py
	touch $@

clean:
	rm -rf $(VENV) vigil/v1/*_pb2* $(GEN_STAMP) build dist *.egg-info
