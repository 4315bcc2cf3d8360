# `make demo` and `make test` set everything up on a fresh machine: a local venv, torch from the
# machine's local wheels (pip is capped at torch 2.14.1 / torchvision 0.29.1 here), then this package.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint lint-fix test test-fast clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# anomalib 2.7 imports deprecated timm modules; their FutureWarnings are noise in the demo.
	PYTHONWARNINGS=ignore::FutureWarning $(BIN)/anomalib-dsr demo --output demo_output

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

lint-fix: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/python -m pytest -q -rs --timeout=1800

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m 'not slow'

clean:
	rm -rf demo_output results runs .pytest_cache
