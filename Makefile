# make demo / make test / make lab / make notebooks: each sets itself up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lab notebooks book setup clean

setup: $(STAMP)

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tinymm tour

test: $(STAMP)
	$(BIN)/python -m pytest -q

notebooks: $(STAMP)
	$(BIN)/python -m tiny_mm.notebooks

lab: notebooks
	$(BIN)/jupyter lab chapters

clean:
	rm -rf $(VENV) build *.egg-info

book: $(STAMP)
	$(BIN)/mdbook build
