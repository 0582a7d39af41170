# Every target sets up .venv by itself on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := PYTHONPATH=$(CURDIR) $(PY)

.DEFAULT_GOAL := help
.PHONY: help install test reproduce-table1 report-table1 bench clean
.PHONY: reproduce-small reproduce-table7 report-table7 reproduce-frozen report-frozen reproduce-table8 report-table8

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
	$(RUN) -m lodo.run experiment=table1; status=$$?; $(MAKE) report-table1 && exit $$status

report-table1: install  ## rebuild results/table1.* and figure2.* from runs/table1 without training
	$(RUN) scripts/report_table1.py runs/table1 results --readme README.md

# A sweep that fails partway (e.g. an optimizer not written yet) still gets its report from the
# runs that finished; the target then exits with the sweep's status.
# Table 7's Newton runs 10k steps (its loss is stationary from step 1; see configs/experiment/table7.yaml).
reproduce-table7: install  ## Table 7 + Figure 8: the bowl at 5 noise variances, 8 seeds x 100k steps per optimizer
	$(RUN) -m lodo.run experiment=table7; status=$$?; \
	$(RUN) -m lodo.run experiment=table7 optimizer=newton steps=10000 || status=1; \
	$(MAKE) report-table7 && exit $$status

report-table7: install  ## rebuild results/table7.* and figure8.* from runs/table7 without training
	$(RUN) scripts/report_table7.py runs/table7 results --readme README.md

reproduce-frozen: install  ## frozen-preconditioner test: LODO 100k steps, then its frozen G on a new bowl
	$(RUN) -m lodo.run experiment=frozen; status=$$?; $(MAKE) report-frozen && exit $$status

report-frozen: install  ## rebuild results/frozen.* from runs/frozen without training
	$(RUN) scripts/report_frozen.py runs/frozen results --readme README.md

reproduce-table8: install  ## Table 8 + Figures 3, 11: Rosenbrock, 8 seeds x 200 steps per optimizer
	$(RUN) -m lodo.run experiment=table8; status=$$?; $(MAKE) report-table8 && exit $$status

report-table8: install  ## rebuild results/table8.* and figures 3, 11 from runs/table8 without training
	$(RUN) scripts/report_table8.py runs/table8 results --readme README.md

reproduce-small: install  ## every small-task experiment in turn: Table 1, Table 7, frozen test, Table 8
	status=0; for t in table1 table7 frozen table8; do $(MAKE) reproduce-$$t || status=1; done; exit $$status

bench: install  ## throughput of every optimizer on the bowl (8 seeds) -> results/bench.md
	$(RUN) scripts/bench.py --out results/bench.md

.PHONY: meta-train-l2l
meta-train-l2l: install  ## meta-train the L2LBGDBGD LSTM on noisy bowls -> optimizers/weights/ (a few minutes)
	$(RUN) scripts/meta_train_l2l.py --out optimizers/weights/l2lbgdbgd_bowl.npz

clean:  ## remove run folders (not results/)
	rm -rf outputs multirun runs
