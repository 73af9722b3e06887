# One command to set up and run the main job, one to set up and run the tests.
# Both are idempotent: `setup` only reinstalls when pyproject.toml changed.
# `make test` also adds the three Debian packages some tests need (Fashion-MNIST, Chromium and
# the PostgreSQL server) where apt-get runs as root; elsewhere it says what to install, and the
# tests that need a missing one fail with one line naming the package.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Which torch build: auto (CUDA where nvidia-smi lists a GPU, else CPU), cpu, cuda, or keep.
TORCH_BUILD ?= auto
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= recipes,plots,sweep,dev

.PHONY: setup run test lint docs bench system data browser postgres clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) tools/install_torch.py --build $(TORCH_BUILD) --version $(TORCH_VERSION) --cpu-index $(TORCH_CPU_INDEX)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@$(PY) -c "import torch; print('installed: torch', torch.__version__, '(CUDA', (torch.version.cuda or 'none') + ')')"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m recipes.bert_finetune --optimizer adamw

# Two pytest workers, one test file each at a time (module fixtures are built once).
TEST_WORKERS ?= 2

test: setup system
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on any warning
# (a broken link, a missing reference).
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

bench: setup
	$(PY) bench/optimizer_step.py

# Fashion-MNIST for the vision recipes and their tests ships as a Debian package: installed here
# where apt-get runs as root; elsewhere the line below says how to get it.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "note: could not install dataset-fashion-mnist; the vision recipes need --data.root"; \
	else \
		echo "note: Fashion-MNIST: sudo apt-get install dataset-fashion-mnist, or pass a folder with its four idx files as --data.root"; \
	fi

# Debian's Chromium for the page tests (tests/recipes/browser.py), where apt-get runs as root.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
		|| echo "note: could not install chromium; the browser tests will fail"; \
	else \
		echo "note: the browser tests need Chromium: sudo apt-get install chromium"; \
	fi

# Debian's PostgreSQL server for the sweep's PostgreSQL test (the test starts its own server in
# a temporary folder, as an unprivileged user when run as root).
postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 \
		|| echo "note: could not install postgresql; the PostgreSQL sweep test will fail"; \
	else \
		echo "note: the PostgreSQL sweep test needs Debian's server: sudo apt-get install postgresql"; \
	fi

# The system packages the test suite needs (each target does nothing where it is installed).
system: data browser postgres

clean:
	rm -rf $(VENV) site wandb lightning_logs .pytest_cache .ruff_cache
