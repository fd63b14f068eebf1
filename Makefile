# Two commands do all the set-up: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdx-installed

.PHONY: install demo demo-face demo-face-labelfree test test-fast data bench faults mutation mutation-quick clean

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
	HF_HUB_OFFLINE=1 $(VENV)/bin/kdx-pipeline experiment=fmnist_fewlabels

demo-face: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/kdx-pipeline experiment=orl_faces

# Label-free face distillation: SFace teaches MobileFaceNet without a single identity label (README: Face recognition).
demo-face-labelfree: $(STAMP)
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 $(VENV)/bin/kdx-pipeline experiment=orl_faces_labelfree

# Two pytest workers on two cores: one torch thread each, or they fight over the cores.
TEST_ENV := HF_HUB_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1

# lint-imports first: the layers of pyproject.toml's [tool.importlinter] contract import only downwards.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(TEST_ENV) $(PY) -m pytest -q -n 2 --durations=15

test-fast: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest -q -n 2 -m "not slow"

bench: $(STAMP) data
	$(PY) scripts/bench_distill.py
	$(PY) scripts/bench_cache.py

# Fault soak: kill -9 a small run and a small sweep at random moments (some during a checkpoint write), resume,
# and check that no file is corrupt, no finished job is redone and the final metrics equal an uninterrupted run;
# then a run folder on a full tmpfs (root only, else skipped with the reason) and images changed in place under
# a teacher cache. `make faults FAULT_CYCLES=40 FAULT_SWEEP_CYCLES=20` soaks longer; the test suite runs a
# 3 + 2 cycle version without the last two (they have their own tests).
FAULT_CYCLES ?= 12
FAULT_SWEEP_CYCLES ?= 6
faults: $(STAMP)
	$(TEST_ENV) $(PY) scripts/faults.py --cycles $(FAULT_CYCLES) --sweep-cycles $(FAULT_SWEEP_CYCLES)

# Mutation testing of the numerical core (losses, distillers, hosts, verification, margin heads, RecordIO reader):
# a per-module table of mutants killed by the tests; fails under 90% or on a survivor not explained in
# docs/mutation.md. The whole scope takes ~45 min on 2 cores; mutation-quick (the logit losses) under 9.
MUTATION_STAMP := $(VENV)/.kdx-mutation-installed
$(MUTATION_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[test,mutation]"
	@touch $(MUTATION_STAMP)

mutation: $(MUTATION_STAMP)
	$(PY) scripts/mutation.py

mutation-quick: $(MUTATION_STAMP)
	$(PY) scripts/mutation.py --quick

clean:
	rm -rf outputs multirun .pytest_cache mutants
