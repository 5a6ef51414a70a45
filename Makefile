# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/vigil/v1/*.proto)
GEN_STAMP := vigil/v1/.generated

.PHONY: run test test-fast bench lint typecheck proto install clean

run: $(STAMP) $(GEN_STAMP)
	$(BIN)/vigil up

test: $(STAMP) $(GEN_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q

test-fast: $(STAMP) $(GEN_STAMP)
	$(BIN)/pytest -q -m "not slow"

bench: $(STAMP) $(GEN_STAMP)
	$(BIN)/python -m bench

lint: $(STAMP) $(GEN_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP) $(GEN_STAMP)
	$(BIN)/mypy

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]' --config-settings editable_mode=compat
	touch $@

proto: $(GEN_STAMP)

# Generated code is never committed or edited by hand: it comes from here only.
$(GEN_STAMP): $(PROTOS) $(STAMP)
	rm -rf vigil
	mkdir -p vigil/v1
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
		--python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(PROTOS)
	touch vigil/__init__.py vigil/v1/__init__.py vigil/py.typed
	touch $@

clean:
	rm -rf $(VENV) vigil build *.egg-info
