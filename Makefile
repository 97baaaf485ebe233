# Two commands on a fresh machine: `make demo` and `make test` (both build .venv when needed).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.selfemo-installed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled

.PHONY: venv test test-fast demo clean
venv: $(STAMP)

$(STAMP): requirements/cpu.txt requirements/cpu.lock requirements/assets.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/cpu.txt -c requirements/cpu.lock
	$(PY) -m pip install -q --no-deps -r requirements/assets.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest --durations=10

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	bash recipes/run_cpu_demo.sh

clean:
	rm -rf $(VENV) outputs
