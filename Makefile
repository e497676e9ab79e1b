# The two commands a newcomer types: `make demo` (the main job, end to end on the embedded victim)
# and `make test`. Both create/refresh the virtualenv from requirements.txt when it changed.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEMO_DIR ?= outputs/demo

.PHONY: demo test install

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

demo: install
	$(OFFLINE) $(PYTHON) make_tiny_victim.py --output_dir $(DEMO_DIR)/victim --seed 0 --overwrite
	$(OFFLINE) $(PYTHON) -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no \
	  --dynamo_backend no generate_synthetic.py \
	  --pretrained_model_name_or_path $(DEMO_DIR)/victim/pipeline --domains_file $(DEMO_DIR)/victim/domains.json \
	  --num_images_per_domain 20 --num_inference_steps 25 --sample_batch_size 20 \
	  --output_dir $(DEMO_DIR)/synthetic --overwrite

test: install
	$(OFFLINE) $(PYTHON) -m pytest -q tests
