# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdx-installed

.PHONY: install demo demo-face test test-fast data bench clean

install: $(STAMP)

# Create the environment if missing and install kdx (editable) with everything it needs.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[test]"
	@touch $(STAMP)

# Fashion-MNIST for the demo: Debian's package where apt works, torchvision's download otherwise.
data: $(STAMP)
	@bash scripts/get_fashion_mnist.sh

demo: $(STAMP) data
	HF_HUB_OFFLINE=1 $(VENV)/bin/kdx-pipeline experiment=fmnist

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -n 2 --durations=15

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q -n 2 -m "not slow"

bench: $(STAMP)
	$(PY) scripts/bench_distill.py

clean:
	rm -rf outputs multirun .pytest_cache
