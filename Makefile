# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
REPO   ?= models
MODEL  ?= resnet50

.PHONY: venv run test lint protos bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ./clients/python -e '.[builder,dev]'
	touch $@

venv: $(STAMP)

# Built once; later runs reuse it.
$(REPO)/$(MODEL)/1/model.onnx: | $(STAMP)
	$(BIN)/resnet-serve build $(MODEL) --repo $(REPO)

run: $(STAMP) $(REPO)/$(MODEL)/1/model.onnx
	$(BIN)/resnet-serve serve --repo $(REPO)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	$(BIN)/pytest

protos: $(STAMP)
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
