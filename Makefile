# The whole set-up on a fresh machine: `make demo` (the CPU quickstart) or `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.setup-stamp
UV := $(PYTHON) -m uv

.PHONY: setup demo test test-all lint clean

setup: $(STAMP)

# --compile-bytecode: every engine and trainer process imports vLLM, torch and transformers; with
# prebuilt .pyc files that takes about half as long (the sandbox never writes bytecode itself).
$(STAMP): pyproject.toml constraints/cpu-override.txt
	@$(UV) --version >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	$(UV) pip install --quiet --compile-bytecode --python $(VENV)/bin/python \
		--override constraints/cpu-override.txt -e ".[cpu,dev]"
	@touch $(STAMP)

demo: setup
	$(VENV)/bin/verl-async

test: setup
	$(VENV)/bin/python -m pytest -q tests

test-all: setup
	$(VENV)/bin/python -m pytest -q -m "" tests

lint: setup
	$(VENV)/bin/ruff check verl_async tests

clean:
	rm -rf $(VENV) outputs
