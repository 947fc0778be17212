# Checkout Pulse. Quick start on a fresh machine: `make demo`, then `make test` (README.md).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PULSE := $(VENV)/bin/pulse
# A marker expression for `make test`, e.g. TEST_MARKERS='not slow'; empty runs every tier (as CI does).
TEST_MARKERS ?=
# More pytest arguments, e.g. PYTEST_ARGS='-x tests/unit'.
PYTEST_ARGS ?=
LAB_HOST ?= 127.0.0.1
LAB_PORT ?= 8888
# Jupyter refuses to run as root unless told; CI machines and containers run as root.
ALLOW_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: help venv services services-check setup demo test lint lab clean distclean

help:
	@echo "make demo      install everything, start the services, seed, run a checkout through every saga path"
	@echo "make test      install, start the services, run the test suite (TEST_MARKERS='not slow' to select)"
	@echo "make lint      ruff check, ruff format --check and mypy, as configured in pyproject.toml (CI runs it)"
	@echo "make lab       JupyterLab on http://$(LAB_HOST):$(LAB_PORT) in notebooks/"
	@echo "make setup     install (.venv), start the services, migrate and seed the database"
	@echo "make services  start what does not answer (scripts/services.sh up); services-check only reports"
	@echo "make clean     remove caches and build files; distclean also removes .venv"

venv:
	@scripts/bootstrap.sh

services:
	@scripts/services.sh up

services-check:
	@scripts/services.sh check

setup: venv services
	$(PULSE) db migrate
	$(PULSE) db seed

demo: setup
	$(PULSE) demo

# pytest exits 5 when it collected nothing: that is a failure here, a suite that tests nothing must not pass.
test: venv services
	@$(PY) -m pytest -q $(if $(TEST_MARKERS),-m "$(TEST_MARKERS)") $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests; that counts as a failure." >&2; fi; \
	exit $$status

lint: venv
	@PULSE_VENV=$(VENV) scripts/lint.sh

lab: setup
	$(VENV)/bin/jupyter lab --no-browser --ip=$(LAB_HOST) --port=$(LAB_PORT) \
		--ServerApp.root_dir=notebooks $(ALLOW_ROOT)

clean:
	rm -rf build/ *.egg-info .pytest_cache .mypy_cache .ruff_cache tests/artifacts
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -print0 \
		| xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV)
