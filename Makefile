# Fresh machine: `make run` (demo on the sample cohort) and `make test` (the whole suite).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
KB := $(VENV)/bin/kneebatch
MODEL ?= models/model3d_state_dict.pth
SAMPLE ?= data/sample
MANIFEST ?= manifests/sample.csv
OUT ?= results/sample
SUBJECTS ?= 4

.PHONY: run test lint clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# ImageNet weights when they can be downloaded or are cached; else a loud banner and seeded random
# weights, recorded as such in every output. (`kneebatch build-model` itself never falls back.)
$(MODEL): | $(VENV)/.installed
	@$(KB) build-model --weights imagenet --out $(MODEL) || { \
	  echo; echo "################################################################################"; \
	  echo "#  NO IMAGENET WEIGHTS: could not download torchvision's DenseNet121 weights.     #"; \
	  echo "#  The demo goes on with SEEDED RANDOM WEIGHTS (recorded as 'random:seed=0' in    #"; \
	  echo "#  every output). Its numbers mean nothing. For real features run on a machine    #"; \
	  echo "#  with internet, or: kneebatch build-model --weights /path/densenet121-*.pth     #"; \
	  echo "################################################################################"; echo; \
	  $(KB) build-model --weights random --seed 0 --out $(MODEL); }

$(SAMPLE)/manifest.csv: | $(VENV)/.installed
	$(KB) sample $(SAMPLE) --subjects $(SUBJECTS)

run: $(MODEL) $(SAMPLE)/manifest.csv
	$(KB) run $(MANIFEST) --out $(OUT) --model $(MODEL) --qc
	$(KB) report $(OUT)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check kneebatch tests benchmarks
	$(VENV)/bin/mypy kneebatch

test: lint
	$(VENV)/bin/python -m pytest

clean:
	rm -rf results models $(SAMPLE)
