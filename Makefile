# bitnet-gguf: convert BitNet b1.58 checkpoints to GGUF out of core.
#   make convert MODEL=<dir|org/name|hf://org/name|https://host/dir/> [OUT=<file>] [TYPE=tq2_0|tq1_0] [MEM=4GiB] [WORK=<dir>]
#   make convert MODEL=<dir> TYPE=tq2_0,i2_s,iq2_bn [OUT=<dir>]   one file per type from one read
#   make convert                 converts a small generated demo checkpoint
#   make test                    runs the test suite on every core (builds llama.cpp once, ~6 min;
#                                installs llama.cpp's converter and torch once, ~1 min, 1.2 GB)
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

.PHONY: convert test bench demo-model clean venv reference-converter

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

# llama.cpp's own converter, which tests/test_reference_converter.py compares our files
# with: convert_hf_to_gguf.py, conversion/ and gguf-py/ from the llama-cpp-python sdist
# of the release the `llama` extra pins, and a virtual environment of their own with
# what they import. Their own venv because transformers 4.57.6 wants huggingface-hub<1.0
# and would downgrade ours. torch must be asked for as exactly 2.13.0: that is the CPU
# wheel on the machine's disk; any other torch spec downloads a multi-GB CUDA build.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([^"]*\)".*/\1/p' pyproject.toml)
LLAMA_CONVERT     := $(BUILD)/llama.cpp-convert
LLAMA_CONVERT_DEPS := torch==2.13.0 transformers==4.57.6 'sentencepiece>=0.1.98,<0.3' pyyaml numpy
SDIST_ROOT        := llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp

reference-converter: $(LLAMA_CONVERT)/.stamp-$(LLAMA_CPP_VERSION)

$(LLAMA_CONVERT)/.stamp-$(LLAMA_CPP_VERSION): $(VENV)/.stamp-base
	@test -n "$(LLAMA_CPP_VERSION)" || { echo 'pyproject.toml: no "llama-cpp-python==VERSION" pin in the llama extra' >&2; exit 1; }
	rm -rf $(LLAMA_CONVERT)/.stamp-* $(LLAMA_CONVERT)/sdist $(LLAMA_CONVERT)/src
	mkdir -p $(LLAMA_CONVERT)/src
	$(PY) -m pip download -q --no-deps --no-binary :all: llama-cpp-python==$(LLAMA_CPP_VERSION) -d $(LLAMA_CONVERT)/sdist
	tar -xzf $(LLAMA_CONVERT)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_CONVERT)/src \
		--strip-components=3 $(SDIST_ROOT)/convert_hf_to_gguf.py $(SDIST_ROOT)/conversion $(SDIST_ROOT)/gguf-py \
		$(SDIST_ROOT)/models/ggml-vocab-llama-bpe.gguf
	echo $(LLAMA_CPP_VERSION) > $(LLAMA_CONVERT)/src/VERSION
	rm -rf $(LLAMA_CONVERT)/sdist
	test -x $(LLAMA_CONVERT)/venv/bin/python || $(PYTHON) -m venv $(LLAMA_CONVERT)/venv
	$(LLAMA_CONVERT)/venv/bin/python -m pip install -q $(LLAMA_CONVERT_DEPS)
	touch $@

demo-model: $(DEMO_MODEL)/config.json

# generated once, so an interrupted `make convert` resumes instead of starting over
$(DEMO_MODEL)/config.json: $(VENV)/.stamp-base
	$(PY) -m tests.synthetic $(DEMO_MODEL)

ifeq ($(strip $(MODEL)),)
comma := ,
# the demo's default output: build/demo-TYPE.gguf, or build/ for a comma list of types (a file per type)
DEMO_OUT = $(if $(findstring $(comma),$(TYPE)),$(BUILD),$(BUILD)/demo-$(if $(TYPE),$(TYPE),tq2_0).gguf)

convert: demo-model
	$(PY) -m pipeline convert $(DEMO_MODEL) -o "$(if $(OUT),$(OUT),$(DEMO_OUT))" \
		$(if $(TYPE),--type "$(TYPE)") $(if $(MEM),--memory-limit "$(MEM)") $(if $(WORK),--workdir "$(WORK)") \
		$(if $(LOW_DISK),--low-disk)
else
convert: $(VENV)/.stamp-base
	$(PY) -m pipeline convert "$(MODEL)" $(if $(OUT),-o "$(OUT)") \
		$(if $(TYPE),--type "$(TYPE)") $(if $(MEM),--memory-limit "$(MEM)") $(if $(WORK),--workdir "$(WORK)") \
		$(if $(LOW_DISK),--low-disk)
endif

# one pytest worker per core (pytest-xdist), each test sent to whichever worker is free
# (docs/testing.md); TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= auto

test: $(VENV)/.stamp-test reference-converter
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: $(VENV)/.stamp-test reference-converter
	$(PY) -m tests.bench --free-disk

clean:
	rm -rf $(BUILD)
