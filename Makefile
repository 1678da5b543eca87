# Two entry points for a fresh machine: `make demo` and `make test` (see README).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The CPU build of PyTorch goes in first: a plain `torch` requirement resolved by pip would
# pull the newest CUDA build (several GB). Override for a GPU machine, e.g. TORCH_SPEC=torch==2.13.0+cu130.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-fast install

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/scgrn demo

test: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile -m "not soak" --durations=15

test-fast: $(STAMP)
	$(BIN)/pytest -n 2 --dist loadfile -m "not slow"
