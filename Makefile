# make demo / make test / make lab / make notebooks: each sets itself up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lab notebooks book setup speech clean

setup: $(STAMP)

# Re-install only when the project's dependencies change.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/tinymm tour

test: $(STAMP) speech
	$(BIN)/python -m pytest -q

# espeak-ng speaks the test sentences for chapter 9 (log-mel on real speech,
# the tiny digit transcriber). Best effort: installed from Debian's packages
# where we are root with apt; elsewhere those tests skip and say why.
speech:
	@command -v espeak-ng >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && { apt-get install -y -q --no-install-recommends espeak-ng >/dev/null 2>&1 \
	            || { apt-get update -q >/dev/null 2>&1 \
	                 && apt-get install -y -q --no-install-recommends espeak-ng >/dev/null 2>&1; }; } \
	       && echo "installed espeak-ng (Debian package)"; } \
	  || echo "espeak-ng not installed (needs root and apt-get): the speech tests will skip"

notebooks: $(STAMP)
	$(BIN)/python -m tiny_mm.notebooks

lab: notebooks
	$(BIN)/jupyter lab chapters

clean:
	rm -rf $(VENV) build *.egg-info

book: $(STAMP)
	$(BIN)/mdbook build
