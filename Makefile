# splitzip-vllm developer entry points. Every target creates .venv in the repo root on first use.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: venv build test test-codec test-e2e demo bench cuda-check clean

venv:
	bash scripts/setup_venv.sh

build: venv
	.venv/bin/pip install -q --no-build-isolation -e .

test: build cuda-check
	$(PY) -m pytest tests -v -rs --timeout=1800

test-codec: build
	$(PY) -m pytest tests -v -rs -m "not e2e"

test-e2e: build
	$(PY) -m pytest tests -v -rs -m e2e

demo: build
	$(PY) examples/cpu_1p1d.py

bench: build
	$(PY) benchmarks/run_all.py $(ARGS)

cuda-check:
	@if command -v nvcc >/dev/null 2>&1; then bash scripts/check_cuda_compile.sh; \
	else echo "nvcc not found: skipping the CUDA compile check"; fi

clean:
	rm -rf build *.egg-info splitzip_vllm/*.so out
