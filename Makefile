PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.fusecc-installed

.PHONY: venv demo demo-train demo-hpo test test-fast bench kernels-report gpu-check clean

# create the virtual environment if absent, (re)install when the requirements change
$(STAMP): requirements.txt setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q -r requirements.txt
	$(VPY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m fusecc.demo

demo-train: $(STAMP)
	$(VPY) examples/train_digits.py

# a 40-trial Optuna search (lr x weight decay x momentum, Hyperband) packed 16 trials at a time, and the same study
# one trial at a time with torch: the best trial of each and the speed-up
demo-hpo: $(STAMP)
	$(VPY) examples/hpo_digits.py

# two workers (pytest-xdist), each running whole test files: module fixtures and file order stay as written
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(VPY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# the README's tables: five models, five providers; inference at N in 1 4 8 16 32 with torch.compile at N >= 4 on
# every model (~30 min on 2 cores), a training step at N in 4 16 with torch.compile at N=16 but not on densenet121
# (~16 min). BENCH_ARGS adds options to both (--full: N in 1 2 4 8 16 32 and torch.compile everywhere, hours).
# bench/plot.py redraws the plot from the CSVs.
BENCH_ARGS ?=
bench: $(STAMP)
	$(VPY) bench/bench_inference.py --n 1 4 8 16 32 --compile-n 4 8 16 32 \
		--compile-models mlp,resnet18,mobilenet_v2,densenet121,transformer \
		--markdown --csv bench/results/inference.csv $(BENCH_ARGS)
	$(VPY) bench/bench_train.py --n 4 16 --markdown --csv bench/results/train.csv $(BENCH_ARGS)
	$(VPY) bench/plot.py bench/results/inference.csv bench/results/train.csv --out bench/results/speedup.png

# compile every Triton kernel for sm_80 / sm_90 (no GPU needed) and print registers, spills, shared memory
kernels-report: $(STAMP)
	env -u TRITON_INTERPRET $(VPY) -m fusecc.kernels.report

# the GPU check (docs/gpu.md): on a CUDA machine with its own python3 (torch, triton, torchvision, pytest), no
# network and no venv: fusecc is built from this checkout against that torch. Without a GPU it is a dry run.
GPU_OUT ?= gpu-check-report
gpu-check:
	$(PY) bench/gpu_check.py --out $(GPU_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
