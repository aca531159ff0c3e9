# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean bench bench-gpu

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/robucap demo --out runs/demo

test: $(STAMP)
	$(PY) -m ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# Benchmarks run as modules from the repository root (python -m benchmarks.<name>); figures go to docs/benchmarks.md.
bench: $(STAMP)
	$(PY) -m benchmarks.train_step --threads 1
	$(PY) -m benchmarks.adversarial_step

# Every benchmark on a GPU, in under 8 minutes in all (benchmarks/README.md); cli_startup has no device and runs as is.
# Results go to benchmarks/results/gpu/, beside the CPU figures rather than over them.
GPU_OUT := benchmarks/results/gpu
bench-gpu: $(STAMP)
	$(PY) -m benchmarks.train_step --device cuda --steps 20 --warmup 5 --repeats 5 --out $(GPU_OUT)/train_step.json
	$(PY) -m benchmarks.adversarial_step --device cuda --out $(GPU_OUT)/adversarial_step.json
	$(PY) -m benchmarks.show_and_fool --device cuda --iterations 100 --out $(GPU_OUT)/show_and_fool.json
	$(PY) -m benchmarks.dag --device cuda --iterations 20 --repeats 3 --out $(GPU_OUT)/dag.json
	$(PY) -m benchmarks.eval_overhead --device cuda --out $(GPU_OUT)/eval_overhead.json
	$(PY) -m benchmarks.cli_startup --out $(GPU_OUT)/cli_startup.json

clean:
	rm -rf runs wandb lightning_logs
