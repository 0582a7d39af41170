# Every target sets up .venv by itself on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN := $(PY)

.DEFAULT_GOAL := help
.PHONY: help install test test-long test-fast reproduce-table1 report-table1 bench clean
.PHONY: reproduce-small reproduce-table7 report-table7 reproduce-frozen report-frozen reproduce-table8 report-table8

help:  ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{n[NR]=$$1; d[NR]=$$2; if (length($$1) > w) w = length($$1)} \
		END {for (i = 1; i <= NR; i++) printf "  make %-*s  %s\n", w, n[i], d[i]}'

install: $(VENV)/.installed  ## create .venv: the pinned requirements, then this project in editable mode

# The pins (requirements.txt) first, then the package itself (pyproject.toml) without re-resolving them.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --config-settings editable_mode=compat -e .
	touch $@

# One pytest worker per core (pytest-xdist). --dist loadgroup hands each test to the next free worker, but
# keeps a file marked xdist_group on one worker, so its module fixture (e.g. test_bad_input's batch of
# command lines) runs once, not once per worker; tests/conftest.py starts the longest work first.
test: install  ## run the test suite (all but the few marked long: make test-long)
	$(RUN) -m pytest -q -n auto --dist loadgroup --durations=15 -m "not long" tests

# A minute of real processes each: kill -9 mid-run, SIGTERM, submitit's requeue, a GA sweep stopped and resumed,
# model.fit under MirroredStrategy on two logical devices against one device, whole multiruns (joblib, Table 7,
# a smoke run of Table 8 through its report).
test-long: install  ## the end-to-end checks marked long (CI runs them after make test)
	$(RUN) -m pytest -q -n auto --dist loadgroup --durations=5 -m long tests

# The inner loop: everything not marked slow (no subprocesses, no compiled image models, no end-to-end runs).
test-fast: install  ## the tests not marked slow (the inner loop)
	$(RUN) -m pytest -q -n auto --dist loadgroup -m "not slow and not long" tests

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

bench: install  ## throughput of every optimizer on the bowl (8 seeds) -> results/bench.md, then bench-images
	$(RUN) scripts/bench.py --out results/bench.md
	$(MAKE) bench-images

.PHONY: bench-images
bench-images: install  ## image-task step time per optimizer on CPU: PixelCNN at batch 256, ResNet-18 at batch 8
	$(RUN) scripts/bench_images.py --task pixelcnn_mnist --batch 256 --steps 5 --repeats 2
	$(RUN) scripts/bench_images.py --task resnet18_cifar10 --batch 8 --steps 3 --repeats 2 \
	  --optimizers adam,momentum,rmsprop,yogi,lars

# LODO's state is ~1.7 KB per parameter: on ResNet-18 the LODO run peaks near 22 GB (skipped if that much
# is not free). On a shared machine: make bench-memory BENCH_MEMORY_ARGS="--n 1000000 2000000 --max-gb 5"
BENCH_MEMORY_ARGS ?=
.PHONY: bench-memory
bench-memory: install  ## LODO vs Adam: state bytes/parameter, peak RSS, step time on ResNet-18 at batch 32 -> results/bench_memory.md
	$(RUN) scripts/bench_memory.py $(BENCH_MEMORY_ARGS) --out results/bench_memory.md

# Image tasks (SPEC §3.3-3.4, §5). The paper's scale needs GPUs and the real MNIST / CIFAR-10 (`make data`);
# the *-cpu targets run the reduced scale (scale=cpu: 1,000 steps, 1 seed, batch 32, 50 test images) on real Fashion-MNIST
# from its original files (Debian's dataset-fashion-mnist) and report into results/image_cpu/.
.PHONY: reproduce-table2 report-table2 reproduce-table3 report-table3 reproduce-figure5 report-figure5
.PHONY: reproduce-table4 report-table4 reproduce-images-cpu reproduce-table2-cpu reproduce-table3-cpu reproduce-figure5-cpu
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist
# the sweep folder's name at scale=cpu (configs/scale/cpu.yaml)
CPU_RUNS = fashion_mnist_1000steps
CPU_SCALE = scale=cpu task.dataset=fashion_mnist task.data.source=files task.data.path=$(FASHION_MNIST)
CPU_EXPECT = --steps 1000 --seeds 1  # what the reports check every run has (the paper's scale otherwise)
IMAGE_REPORT = $(RUN) scripts/report_images.py

reproduce-table2: install  ## Table 2 + Figures 4, 9, 10: image generation on MNIST, 8 seeds x (300k steps, 50k s)
	$(RUN) -m lodo.run experiment=table2; status=$$?; $(MAKE) report-table2 && exit $$status

report-table2: install  ## rebuild results/table2.* and figures 4, 9, 10 from runs/table2 without training
	$(IMAGE_REPORT) table2 runs/table2/mnist_300000steps results --readme README.md

reproduce-table3: install  ## Table 3: LODO's ablations on image generation (MNIST, paper scale)
	$(RUN) -m lodo.run experiment=table3; status=$$?; $(MAKE) report-table3 && exit $$status

report-table3: install  ## rebuild results/table3.* from runs/table3 without training
	$(IMAGE_REPORT) table3 runs/table3/mnist_300000steps results --readme README.md

reproduce-figure5: install  ## Figure 5: LODO's momentum sweep on image generation (MNIST, paper scale)
	$(RUN) -m lodo.run experiment=figure5; status=$$?; $(MAKE) report-figure5 && exit $$status

report-figure5: install  ## rebuild results/figure5.* from runs/figure5 without training
	$(IMAGE_REPORT) figure5 runs/figure5/mnist_300000steps results

reproduce-table4: install  ## Table 4 + Figure 6: ResNet-18 on CIFAR-10, 8 seeds x (3000 steps, 24k s)
	$(RUN) -m lodo.run experiment=table4; status=$$?; $(MAKE) report-table4 && exit $$status

report-table4: install  ## rebuild results/table4.* and figure6.* from runs/table4 without training
	$(IMAGE_REPORT) table4 runs/table4/resnet18_cifar10_3000steps results --readme README.md

reproduce-table2-cpu: install  ## Table 2 at reduced scale on real Fashion-MNIST (CPU) -> results/image_cpu/
	$(RUN) -m lodo.run experiment=table2 $(CPU_SCALE); status=$$?; \
	$(IMAGE_REPORT) table2 runs/table2/$(CPU_RUNS) results/image_cpu --readme README.md $(CPU_EXPECT) && exit $$status

reproduce-table3-cpu: install  ## Table 3 at reduced scale on real Fashion-MNIST (CPU) -> results/image_cpu/
	$(RUN) -m lodo.run experiment=table3 $(CPU_SCALE); status=$$?; \
	$(IMAGE_REPORT) table3 runs/table3/$(CPU_RUNS) results/image_cpu --readme README.md $(CPU_EXPECT) && exit $$status

reproduce-figure5-cpu: install  ## Figure 5 at reduced scale on real Fashion-MNIST (CPU) -> results/image_cpu/
	$(RUN) -m lodo.run experiment=figure5 $(CPU_SCALE) num_seeds=1; status=$$?; \
	$(IMAGE_REPORT) figure5 runs/figure5/$(CPU_RUNS) results/image_cpu --readme README.md $(CPU_EXPECT) && exit $$status

# The competitiveness and samples targets at a longer reduced scale: LODO and the three standard optimizers,
# 3,000 steps x 2 seeds (about 2 h on an idle 2-core CPU).
CPU_LONG = steps=3000 num_seeds=2 optimizer=lodo,yogi,adam,momentum
.PHONY: reproduce-table2-cpu-3000
reproduce-table2-cpu-3000: install  ## LODO vs Adam, Momentum, Yogi, 3,000 steps x 2 seeds on Fashion-MNIST (CPU) -> results/image_cpu_3000steps/
	$(RUN) -m lodo.run experiment=table2 $(CPU_SCALE) $(CPU_LONG); status=$$?; \
	$(IMAGE_REPORT) table2 runs/table2/fashion_mnist_3000steps results/image_cpu_3000steps \
	  --readme README.md --marker table2_3000steps --steps 3000 --seeds 2 && exit $$status

# The samples target at a longer reduced scale: LODO and Yogi (the best of Table 2 at 3,000 steps), 10,000 steps,
# 1 seed, the two runs side by side on the two cores (joblib launcher), about 1.5 h on a 2-core CPU.
CPU_SAMPLES = steps=10000 num_seeds=1 eval_every=500 optimizer=lodo,yogi hydra/launcher=joblib hydra.launcher.n_jobs=2
.PHONY: reproduce-samples-cpu
reproduce-samples-cpu: install  ## LODO and Yogi, 10,000 steps on Fashion-MNIST (CPU), for the Figure 10 samples -> results/image_cpu_10000steps/
	$(RUN) -m lodo.run experiment=table2 $(CPU_SCALE) $(CPU_SAMPLES); status=$$?; \
	$(IMAGE_REPORT) table2 runs/table2/fashion_mnist_10000steps results/image_cpu_10000steps \
	  --readme README.md --marker table2_10000steps --steps 10000 --seeds 1 && exit $$status

reproduce-images-cpu: install  ## every image-generation experiment at reduced scale on Fashion-MNIST (CPU)
	status=0; for t in table2 table3 figure5; do $(MAKE) reproduce-$$t-cpu || status=1; done; exit $$status

# Beyond the paper: the optimizers the paper did not have (Keras 3's AdamW, Nadam, Lamb, Lion, Adafactor, Muon,
# Schedule-Free AdamW; this project's SOAP and PSGD-Kron), run beside the paper's in the same sweep folders
# (configs/experiment/*_extended.yaml): Table 1 and Table 8 at the paper's scale, Table 2 at the reduced CPU scale.
# Finished runs are not repeated (a rerun of a finished run folder only reports it).
EXTENDED = results/extended
.PHONY: reproduce-extended report-extended
reproduce-extended: install  ## the extended Tables 1, 8 and 2 (CPU scale), paper's and newer optimizers -> results/extended/
	status=0; \
	for experiment in table1 table1_extended table8 table8_extended; do \
	  $(RUN) -m lodo.run experiment=$$experiment || status=1; done; \
	for experiment in table2 table2_extended; do \
	  $(RUN) -m lodo.run experiment=$$experiment $(CPU_SCALE) || status=1; done; \
	$(MAKE) -k report-extended && exit $$status

report-extended: report-extended-table8 report-extended-table1 report-extended-table2  ## rebuild results/extended/ from runs/table1, runs/table8, runs/table2 without training

.PHONY: report-extended-table1 report-extended-table8 report-extended-table2
report-extended-table8: install  ## rebuild results/extended/table8.* and figures 3, 11 from runs/table8
	$(RUN) scripts/report_table8.py runs/table8 $(EXTENDED) --optimizers all --tuned-here results/tuning \
	  --readme README.md --marker extended_table8

report-extended-table1: install  ## rebuild results/extended/table1.*, figure 2 and the throughput chart from runs/table1
	status=0; \
	$(RUN) scripts/report_table1.py runs/table1 $(EXTENDED) --optimizers all --tuned-here results/tuning \
	  --readme README.md --marker extended_table1 || status=1; \
	$(RUN) scripts/report_throughput.py runs/table1 $(EXTENDED) || status=1; \
	exit $$status

report-extended-table2: install  ## rebuild results/extended/table2.* and its figures from runs/table2 (CPU scale)
	$(IMAGE_REPORT) table2 runs/table2/$(CPU_RUNS) $(EXTENDED) --optimizers all $(CPU_EXPECT) \
	  --readme README.md --marker extended_table2

# Ready for a GPU: on a machine with an NVIDIA GPU, at most 10 minutes (a guard stops what is left); without one,
# one line and exit 0.
.PHONY: gpu-check
gpu-check: install  ## on an NVIDIA GPU (10 min at most): every image-task optimizer, LODO/Adam step time and memory, one GPU per job -> results/gpu_check.md
	$(RUN) scripts/gpu_check.py --out results/gpu_check.md

# Needs internet. DATA_DIR empty: TFDS's default folder (~/tensorflow_datasets, or $TFDS_DATA_DIR), which the
# task configs read with data_dir: null; otherwise pass task.data.data_dir=$(DATA_DIR) to the runs.
.PHONY: data
DATA_DIR ?=
data: install  ## download and prepare mnist, fashion_mnist, cifar10 with TFDS into DATA_DIR (needs internet)
	$(RUN) scripts/prepare_data.py --data-dir "$(DATA_DIR)"

.PHONY: meta-train-l2l
meta-train-l2l: install  ## meta-train the L2LBGDBGD LSTM on noisy bowls -> optimizers/weights/ (a few minutes)
	$(RUN) scripts/meta_train_l2l.py --out optimizers/weights/l2lbgdbgd_bowl.npz

# The genetic tuner (SPEC §4.1, hydra/sweeper=ga) on every tunable small-task optimizer, then each result and the
# paper's values on 8 fresh seeds; sweeps and evaluation runs in runs/tuning/<task>/<optimizer>/, results (tuned.yaml,
# plots, log, state) in results/tuning/<task>/<optimizer>/ and results/tuning/summary.md. TUNE_FROM=~tuned centres
# generation 0 on the optimizer's defaults, as the paper did; TUNE_FROM= centres it on the paper's tuned values.
# A rerun continues unfinished sweeps and skips finished runs.
.PHONY: tune-small
TUNE_BOWL ?= adam momentum rmsprop yogi lbfgs olbfgs lodo
TUNE_ROSENBROCK ?= adam momentum rmsprop yogi lodo
TUNE_FROM ?= '~tuned'
TUNE_RUN := nice -n 10 $(PY)
tune-small: install  ## GA-tune the small-task optimizers, compare with the paper's values -> results/tuning/ (hours)
	status=0; \
	for pair in $(foreach o,$(TUNE_BOWL),noisy_quadratic_bowl/$(o)) $(foreach o,$(TUNE_ROSENBROCK),rosenbrock/$(o)); do \
	  task=$${pair%/*}; opt=$${pair#*/}; sweep=runs/tuning/$$pair; \
	  start=$$(date +%s); \
	  $(TUNE_RUN) -m lodo.run -m hydra/sweeper=ga task=$$task optimizer=$$opt $(TUNE_FROM) \
	    hydra.sweep.dir=$$sweep hydra.sweeper.export_dir=results/tuning/$$pair || { status=1; continue; }; \
	  echo "tune-small: $$pair tuned in $$(( $$(date +%s) - start )) s"; \
	  $(TUNE_RUN) -m lodo.run task=$$task optimizer=$$opt progress=false hydra.run.dir=$$sweep/eval_ours \
	    $$($(RUN) scripts/tuning_summary.py --overrides $$sweep/tuned.yaml) || status=1; \
	  $(TUNE_RUN) -m lodo.run task=$$task optimizer=$$opt progress=false hydra.run.dir=$$sweep/eval_paper \
	    || status=1; \
	done; \
	$(RUN) scripts/tuning_summary.py runs/tuning results/tuning && exit $$status

# The newer optimizers of "Beyond the paper", GA-tuned alike (the paper's schedules, generation 0 on each one's
# defaults) and installed as configs/tuned/<task>/<optimizer>.yaml, whose header says so. A rerun continues
# unfinished sweeps and skips finished ones; TUNE_NEWER / TUNE_NEWER_TASKS pick a part.
.PHONY: tune-extended
TUNE_NEWER ?= adamw nadam lamb lion adafactor muon schedule_free_adamw soap psgd_kron
TUNE_NEWER_TASKS ?= noisy_quadratic_bowl rosenbrock
tune-extended: install  ## GA-tune the newer optimizers on the bowl and Rosenbrock -> configs/tuned/, results/tuning/ (hours)
	status=0; \
	for task in $(TUNE_NEWER_TASKS); do for opt in $(TUNE_NEWER); do \
	  $(TUNE_RUN) -m lodo.run -m hydra/sweeper=ga task=$$task optimizer=$$opt '~tuned' \
	    hydra.sweep.dir=runs/tuning/$$task/$$opt hydra.sweeper.export_dir=results/tuning/$$task/$$opt \
	    hydra.sweeper.install=overwrite || status=1; \
	done; done; exit $$status

# The same on image generation at the reduced CPU scale (Fashion-MNIST from Debian's files, schedule
# image_generation_cpu: 2 generations x 6 individuals x 300 steps at batch 32, the paper's halving of the learning
# rates after), installed as configs/tuned/pixelcnn_mnist/<optimizer>.yaml. About 20 minutes per optimizer.
.PHONY: tune-extended-images
tune-extended-images: install  ## GA-tune the newer optimizers on Fashion-MNIST (reduced CPU schedule) -> configs/tuned/pixelcnn_mnist/ (hours)
	status=0; \
	for opt in $(TUNE_NEWER); do \
	  $(TUNE_RUN) -m lodo.run -m hydra/sweeper=ga task=pixelcnn_mnist optimizer=$$opt '~tuned' $(CPU_SCALE) \
	    hydra.sweeper.schedule=image_generation_cpu hydra.sweeper.score_window=0.3 \
	    hydra.sweep.dir=runs/tuning/pixelcnn_fashion_mnist_cpu/$$opt \
	    hydra.sweeper.export_dir=results/tuning/pixelcnn_fashion_mnist_cpu/$$opt hydra.sweeper.install=overwrite \
	    || status=1; \
	done; exit $$status

clean:  ## remove run folders (not results/)
	rm -rf outputs multirun runs
