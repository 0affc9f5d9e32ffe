# The verbs people use. `make serve` and `make test` set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check
HOST   ?= 127.0.0.1
PORT   ?= 8000


.PHONY: serve test test-fast lint bench bench-batching bench-quality loadtest gpu-check gpu-wheels train eval eval-edits fuzz soak ops-tools clean

# torch is pinned here (not in pyproject) to its CPU build, the one CI tests: an unpinned torch
# would pull a multi-GB CUDA build. From the configured index or wheel directory if it has it,
# else from PyTorch's CPU index. On a GPU machine install the CUDA torch into $(VENV) first.
TORCH ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
$(VENV)/.serve: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==$(TORCH)+cpu" 2>/dev/null \
		|| $(PIP) "torch==$(TORCH)+cpu" --index-url $(TORCH_CPU_INDEX)
	$(PIP) -e .
	touch $@

$(VENV)/.test: $(VENV)/.serve pyproject.toml
	$(PIP) -e '.[test]'
	touch $@

serve: $(VENV)/.serve
	$(VENV)/bin/cmserve serve --host $(HOST) --port $(PORT)

test: $(VENV)/.test ops-tools
	TRITON_INTERPRET=1 $(PY) -m pytest

test-fast: $(VENV)/.test
	TRITON_INTERPRET=1 $(PY) -m pytest -m "not slow"

ops-tools: $(VENV)/.test
	deploy/install-tools.sh $(VENV)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check server kernels models bench tests deploy
	$(VENV)/bin/ruff format --check server kernels models bench tests deploy
	$(VENV)/bin/mypy server kernels models bench

# the shipped model: the teacher, ECT from it, then consistency distillation from the teacher
# guided at w = 1.75 seeded with the ECT model, then 600 more CD steps at w = 2 (docs/model.md)
train: $(VENV)/.test
	$(VENV)/bin/cmserve train --preset mnist --run-dir runs/mnist --stop-after 2400
	$(VENV)/bin/cmserve train --preset mnist --run-dir runs/mnist-ect --from-teacher runs/mnist/teacher.json
	$(VENV)/bin/cmserve train --preset mnist-cd --run-dir runs/mnist-cd --from-teacher runs/mnist-ect/consistency.json
	$(VENV)/bin/cmserve train --preset mnist-cd --run-dir runs/mnist-cd2 --from-teacher runs/mnist-cd/consistency.json \
		--set '{"cd_guidance": 2.0}'

# the eval of docs/model.md: 5,000 samples per row on held-out digits, the shipped card's times,
# the teacher unguided and at the consistency model's guidance (`cmserve eval --tune-schedules`
# searches the times on training images into a new card beside a checkpoint)
eval: $(VENV)/.test
	$(VENV)/bin/cmserve eval --teacher-guidance 1,2 --json docs/eval.json --grid docs/samples_2step.png

# zero-shot inpainting and super-resolution on the 500 held-out digits (docs/model.md)
eval-edits: $(VENV)/.test
	$(VENV)/bin/cmserve eval --edits --json docs/eval-edits.json --grid docs/edits_2step.png

bench: $(VENV)/.test
	$(VENV)/bin/cmserve bench sampler --json docs/bench_sampler.json
	$(VENV)/bin/cmserve bench server --json docs/bench_server.json --plot docs/latency_vs_throughput.png

# request- vs step-level batching on mixed workloads (docs/performance.md)
bench-batching: $(VENV)/.test
	$(VENV)/bin/cmserve bench batching --json docs/bench_batching.json

bench-quality: $(VENV)/.test
	$(VENV)/bin/cmserve bench quality --json docs/bench_quality.json

loadtest: $(VENV)/.test
	deploy/locust/run.sh

fuzz: $(VENV)/.test
	$(PY) -m pytest tests/reliability/test_fuzz.py -s --fuzz-cases=2000

soak: $(VENV)/.test
	$(PY) -m pytest tests/reliability/test_load.py -k soak --run-soak

# On a GPU host: its own Python and CUDA torch, no virtual environment, no network. Packages the
# host lacks come from wheels that `make gpu-wheels` downloads beforehand (on a machine with a
# network) into .whl/, installed here into /tmp/cmserve-site.
GPU_PY    ?= python3
GPU_SITE  ?= /tmp/cmserve-site
GPU_OUT   ?= docs/gpu
GPU_BUDGET ?= 540

gpu-check:
	if ls .whl/*.whl >/dev/null 2>&1; then $(GPU_PY) -m pip install -q --no-index --no-deps --no-compile \
		--no-cache-dir --upgrade --target $(GPU_SITE) .whl/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) TRITON_INTERPRET=0 $(GPU_PY) -m bench.gpu_check --out $(GPU_OUT) \
		--budget $(GPU_BUDGET)

# manylinux wheels for CPython 3.12 (the GPU hosts' Python) of what those hosts lack, checked complete,
# the large ones re-compressed to keep tree + wheels under the 64 MiB a device call carries
gpu-wheels:
	python3 -m bench.gpu_wheels --dir .whl --repack

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
