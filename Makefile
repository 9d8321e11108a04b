PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-all lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)
	@echo 'medseg is installed in $(VENV). To run the medseg command, in each new shell:'
	@echo '  source $(VENV)/bin/activate     (or: export PATH="$$PWD/$(BIN):$$PATH")'

lint: $(STAMP)
	$(BIN)/ruff check medseg tests benchmarks
	$(BIN)/ruff format --check medseg tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -n 2 -q

test-all: lint
	$(BIN)/pytest -n 2 -q -m ''

demo: $(STAMP)
	$(BIN)/medseg demo --out demo_out

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
