# Every target sets up .venv by itself on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := PYTHONPATH=$(CURDIR) $(PY)

.DEFAULT_GOAL := help
.PHONY: help install test reproduce-table1 report-table1 bench clean

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv with the pinned requirements

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: install  ## run the test suite
	$(RUN) -m pytest -q tests

reproduce-table1: install  ## Table 1 + Figure 2: 8 seeds x (100k steps, 300 s) per optimizer on the bowl
	$(RUN) -m lodo.run experiment=table1
	$(MAKE) report-table1

report-table1: install  ## rebuild results/table1.* and figure2.* from runs/table1 without training
	$(RUN) scripts/report_table1.py runs/table1 results --readme README.md

bench: install  ## throughput of LODO and Adam on the bowl -> results/bench.md
	$(RUN) scripts/bench.py --out results/bench.md

clean:  ## remove run folders (not results/)
	rm -rf outputs multirun runs
