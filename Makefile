# One command to set up and run the main job, one to set up and run the tests.
# Both are idempotent: `setup` only reinstalls when pyproject.toml changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test lint bench data browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU wheel of torch first, so the ranges below keep it (a bare `torch` would pull CUDA).
	$(PY) -m pip install --quiet "torch==2.13.0" || $(PY) -m pip install --quiet "torch>=2.4,<3"
	$(PY) -m pip install --quiet -e ".[recipes,dev]"
	touch $(STAMP)

setup: $(STAMP) data

# Fashion-MNIST for the vision recipes ships as a Debian package; install it where apt works.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: could not install dataset-fashion-mnist; vision recipes need --data.root"; \
	fi

# Debian's Chromium for the page tests (tests/recipes/test_pages_in_browser.py), where apt works.
browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: could not install chromium; the browser tests will be skipped"; \
	fi

run: setup
	$(PY) -m recipes.bert_finetune --optimizer adamw

test: setup browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) bench/optimizer_step.py

clean:
	rm -rf $(VENV) wandb lightning_logs .pytest_cache .ruff_cache
