# The README's two commands are `make demo` and `make test`; each sets itself up.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test demo bench lint clean

install:
	bash tools/install_env.sh $(VENV)

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(PY) tools/demo.py

bench: install
	$(PY) tools/analysis_tools/bench_scan.py
	$(PY) tools/analysis_tools/bench_backbone.py

clean:
	rm -rf $(VENV) build *.egg-info work_dirs
