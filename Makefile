# bitnet-gguf: convert BitNet b1.58 checkpoints to GGUF out of core.
#   make convert MODEL=<dir> [OUT=<file>] [TYPE=tq2_0|tq1_0] [MEM=4GiB] [WORK=<dir>]
#   make convert                 converts a small generated demo checkpoint
#   make test                    runs the test suite (builds llama.cpp once, ~6 min)
#   make bench                   8B-scale memory/time benchmark (not run by CI)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BUILD  := build

MODEL ?=
OUT   ?=
TYPE  ?=
MEM   ?=
WORK  ?=

DEMO_MODEL := $(BUILD)/demo-model

.PHONY: convert test bench demo-model clean venv

venv: $(VENV)/.stamp-base

$(VENV)/.stamp-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(PY) -m pip install -q -e '.[test]'
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -e '.[llama]'
	touch $@

demo-model: $(DEMO_MODEL)/config.json

# generated once, so an interrupted `make convert` resumes instead of starting over
$(DEMO_MODEL)/config.json: $(VENV)/.stamp-base
	$(PY) -m pipeline.demo $(DEMO_MODEL)

ifeq ($(strip $(MODEL)),)
convert: demo-model
	$(PY) -m pipeline convert $(DEMO_MODEL) -o $(if $(OUT),$(OUT),$(BUILD)/demo-$(if $(TYPE),$(TYPE),tq2_0).gguf) \
		$(if $(TYPE),--type $(TYPE)) $(if $(MEM),--memory-limit $(MEM)) $(if $(WORK),--workdir $(WORK))
else
convert: $(VENV)/.stamp-base
	$(PY) -m pipeline convert "$(MODEL)" $(if $(OUT),-o "$(OUT)") \
		$(if $(TYPE),--type $(TYPE)) $(if $(MEM),--memory-limit $(MEM)) $(if $(WORK),--workdir "$(WORK)")
endif

test: $(VENV)/.stamp-test
	$(PY) -m pytest -q

bench: $(VENV)/.stamp-test
	$(PY) -m tests.bench

clean:
	rm -rf $(BUILD)
