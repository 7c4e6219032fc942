# Mini-LLM pipeline: every user-facing command. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
ACCELERATE ?= $(VENV)/bin/accelerate
export PYTHONPATH := $(CURDIR)
export TOKENIZERS_PARALLELISM ?= false

# ---- variables users set on the command line (make pretrain-tiny BATCH_SIZE=8 …)
MODEL ?= tiny
RAW_DATASET ?= builtin:python-docs
SFT_DATASET ?= builtin:python-docs-sft
DPO_DATASET ?= builtin:python-docs-dpo
# The data dir is named like run_pipeline.py names it: the dataset's file or folder name up to its first dot.
DATA_NAME ?= $(firstword $(subst ., ,$(notdir $(patsubst %/,%,$(subst builtin:,,$(RAW_DATASET))))))
DATA_DIR ?= data/processed/$(DATA_NAME)-$(MODEL)
STAGE ?=
KEEP ?= 3
CKPT ?=
FORCE ?=
ARGS ?=
BATCH_SIZE ?=
LEARNING_RATE ?=
MAX_STEPS ?=
TIME ?=
TRIALS ?=
OUT ?=
DRY_RUN ?=
IMAGE ?= mini-llm-serve
QUANT ?=
ACCELERATE_CONFIG ?=

PRETRAIN_DIR = checkpoints/pretrain/$(MODEL)
SFT_DIR = checkpoints/sft/$(MODEL)
DPO_DIR = checkpoints/dpo/$(MODEL)
# CKPT, else the scripts' default model of MODEL's preset (dpo, else sft, else pretrain: utils/layout.py).
MODEL_CHOICE = $(if $(CKPT),--model_path $(CKPT),--preset $(MODEL))
OVERRIDES = $(if $(BATCH_SIZE),--batch_size $(BATCH_SIZE)) $(if $(LEARNING_RATE),--learning_rate $(LEARNING_RATE)) \
            $(if $(MAX_STEPS),--max_steps $(MAX_STEPS))
# TIME=10m|90m|2h: pretraining for a wall-clock budget instead of a step count (02_pretrain.py --time_budget).
PRETRAIN_OVERRIDES = $(OVERRIDES) $(if $(TIME),--time_budget $(TIME))
# One process needs no launcher; an accelerate config (multi-GPU, FSDP, DeepSpeed) goes through `accelerate launch`.
LAUNCH = $(if $(ACCELERATE_CONFIG),$(ACCELERATE) launch --config_file $(ACCELERATE_CONFIG),$(PYTHON))

.PHONY: help install install-gpu check-env presets preflight create-sample-datasets prepare \
        pretrain-tiny pretrain-small pretrain-base pretrain-tiny-moe sweep \
        resume-pretrain-tiny resume-pretrain-small resume-pretrain-base resume-pretrain-tiny-moe \
        sft dpo evaluate gates report serve serve-batch serve-api pipeline pipeline-full test-pipeline lint test test-gguf test-robustness \
        bench bench-prepare bench-pretrain bench-serve bench-quality \
        config-rtx4090 monitor backup clean clean-checkpoints checkpoints archive-checkpoint gpu-check docker-build docker-run export-gguf \
        cleanup-checkpoints disk-usage

help: ## List every target with one line each
	@echo "usage: make <target> [MODEL=tiny|small|base|tiny-moe] [VAR=value …]"
	@grep -hE '^[a-zA-Z0-9_% -]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{split($$1, names, " "); printf "  %-26s %s\n", names[1], $$2}'

# ---------------------------------------------------------------- setup
install: ## Create .venv, install the pinned requirements (CPU torch here; CUDA build on GPU machines) and the project (editable)
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install -r requirements.txt
	$(VENV)/bin/pip install --no-deps -e .

install-gpu: install ## Also install the optional GPU extras (flash-attn, wandb)
	$(VENV)/bin/pip install -r requirements-gpu.txt --no-build-isolation

check-env: ## Versions of Python, torch, CUDA, the GPU and every library
	$(PYTHON) scripts/check_env.py

presets: ## Every preset with parameter counts (total and non-embedding) from the built model
	$(PYTHON) scripts/show_presets.py

preflight: check-env ## Environment + dry run of MODEL's preset: parameters, memory, time estimate; with TIME=…, what fits
	$(PYTHON) scripts/02_pretrain.py --config config/$(MODEL).json --data_path $(DATA_DIR) --dry_run $(PRETRAIN_OVERRIDES) $(ARGS)

sweep: ## Hyper-parameter search of MODEL's pretraining (Optuna TPE + median pruning): TRIALS=20 TIME=2m per trial; resumable
	$(PYTHON) scripts/sweep.py --config config/$(MODEL).json --data_path $(DATA_DIR) --trials $(or $(TRIALS),20) \
	    --time_budget $(or $(TIME),2m) $(ARGS)

config-rtx4090: ## Write config/accelerate/rtx4090.yaml (one 24 GB GPU, bf16) with accelerate's own writer
	$(ACCELERATE) config default --mixed_precision bf16 --config_file config/accelerate/rtx4090.yaml
	@echo "use it: make pretrain-small ACCELERATE_CONFIG=config/accelerate/rtx4090.yaml"

# ---------------------------------------------------------------- data
create-sample-datasets: ## Write small example pretrain / SFT / DPO files in every supported format to data/sample/
	$(PYTHON) scripts/create_sample_datasets.py --output_dir data/sample $(ARGS)

prepare: ## Stage 01 on RAW_DATASET (default: the built-in offline corpus) -> DATA_DIR
	$(PYTHON) scripts/01_prepare_data.py --input_path $(RAW_DATASET) --output_dir $(DATA_DIR) \
	    --config config/$(MODEL).json $(ARGS)

# ---------------------------------------------------------------- training
pretrain-tiny pretrain-small pretrain-base pretrain-tiny-moe: pretrain-%: ## Stage 02: pretrain a preset on DATA_DIR (also pretrain-small, -base, -tiny-moe)
	$(MAKE) --no-print-directory _pretrain MODEL=$*

resume-pretrain-tiny resume-pretrain-small resume-pretrain-base resume-pretrain-tiny-moe: resume-pretrain-%: ## Continue pretraining from the latest complete checkpoint (also -small, -base, -tiny-moe)
	$(MAKE) --no-print-directory _pretrain MODEL=$* ARGS="--resume_from_checkpoint latest $(ARGS)"

_pretrain:
	$(LAUNCH) scripts/02_pretrain.py --config config/$(MODEL).json --data_path $(DATA_DIR) \
	    --output_dir $(PRETRAIN_DIR) $(PRETRAIN_OVERRIDES) $(ARGS)

sft: ## Stage 03: LoRA SFT of the latest pretrain checkpoint on SFT_DATASET
	$(PYTHON) scripts/03_sft.py --model_path $(PRETRAIN_DIR) --dataset_path $(SFT_DATASET) \
	    --output_dir $(SFT_DIR) $(OVERRIDES) $(ARGS)

dpo: ## Stage 04: DPO of the SFT model on DPO_DATASET
	$(PYTHON) scripts/04_dpo.py --model_path $(SFT_DIR) --dataset_path $(DPO_DATASET) \
	    --output_dir $(DPO_DIR) $(OVERRIDES) $(ARGS)

# ---------------------------------------------------------------- evaluation and serving
evaluate: ## Stage 05: evaluate the newest model (dpo, else sft, else pretrain) -> evaluation_results/<stage>-<preset>/
	$(PYTHON) scripts/05_evaluate.py $(MODEL_CHOICE) $(ARGS)

gates: ## Promotion gates of STAGE (pretrain|sft|dpo, default dpo) on its last evaluation; exit 3 when one fails
	$(PYTHON) scripts/05_evaluate.py --gates $(or $(STAGE),dpo) \
	    --results evaluation_results/$(or $(STAGE),dpo)-$(MODEL)/results.json $(ARGS)

report: ## One Markdown run report with plots -> reports/report.md
	$(PYTHON) scripts/07_report.py --output_dir reports $(ARGS)

serve: ## Interactive chat with the newest model (CKPT=… to choose)
	$(PYTHON) scripts/06_serve.py $(MODEL_CHOICE) --mode interactive $(ARGS)

serve-batch: ## Answer every prompt of PROMPTS=<file.json|jsonl> into OUTPUT (default reports/answers.json)
	@test -n "$(PROMPTS)" || { echo "usage: make serve-batch PROMPTS=prompts.json OUTPUT=answers.json"; exit 2; }
	$(PYTHON) scripts/06_serve.py $(MODEL_CHOICE) --mode batch \
	    --prompts_file $(PROMPTS) --output_file $(or $(OUTPUT),reports/answers.json) $(ARGS)

serve-api: ## REST + OpenAI-compatible API and web chat on http://127.0.0.1:8000
	$(PYTHON) scripts/06_serve.py $(MODEL_CHOICE) --mode api \
	    --host 127.0.0.1 --port 8000 $(ARGS)

# ---------------------------------------------------------------- whole runs
pipeline: ## prepare -> pretrain -> sft -> dpo -> evaluate -> gates -> report (tiny, offline; ~18 min on a 2-core CPU; TIME=… sets pretraining)
	$(PYTHON) scripts/run_pipeline.py --profile cpu-tiny --model $(MODEL) --raw_dataset $(RAW_DATASET) \
	    --sft_dataset $(SFT_DATASET) --dpo_dataset $(DPO_DATASET) $(if $(TIME),--time_budget $(TIME)) \
	    $(if $(FORCE),--force) $(ARGS)

pipeline-full: ## The long run for one 24 GB GPU: MODEL=small (default) or base with the preset's full budget
	$(PYTHON) scripts/run_pipeline.py --profile full $(if $(filter command line,$(origin MODEL)),--model $(MODEL)) --raw_dataset $(RAW_DATASET) \
	    --sft_dataset $(SFT_DATASET) --dpo_dataset $(DPO_DATASET) $(if $(TIME),--time_budget $(TIME)) \
	    $(if $(FORCE),--force) $(ARGS)

test-pipeline: ## The whole chain with micro settings, checked stage by stage and served over HTTP (~2 min on CPU)
	$(PYTHON) -m pytest tests/test_pipeline_e2e.py -v $(ARGS)

lint: ## ruff over the whole tree (rules in pyproject.toml)
	$(VENV)/bin/ruff check .

test: ## Run the test suite (CPU, offline, micro models)
	$(PYTHON) -m pytest $(ARGS)

test-gguf: ## Export micro checkpoints to GGUF and check llama-cpp-python's tokens, log-likelihoods and greedy text against transformers (builds llama-cpp-python: ~15 min)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF" \
	    $(VENV)/bin/pip install -r requirements-gguf.txt
	$(PYTHON) -c "import llama_cpp"
	$(PYTHON) -m pytest tests/test_interop.py -k "gguf or llama_cpp" -v $(ARGS)

test-robustness: ## Kill -9 loop over a micro pretraining + schemathesis fuzzing of a live server (~5 min; installs schemathesis)
	$(VENV)/bin/pip install -q -r requirements-robustness.txt
	$(PYTHON) -m pytest -m robustness tests/test_robustness.py -v $(ARGS)

export-gguf: ## GGUF file + Ollama Modelfile of a pretrain or merged checkpoint: CKPT=checkpoints/sft/tiny/merged QUANT=f16|q8_0|f32 [OUT=file.gguf]
	@test -n "$(CKPT)" || { echo "usage: make export-gguf CKPT=checkpoints/sft/$(MODEL)/merged [QUANT=f16|q8_0|f32] [OUT=file.gguf]"; exit 2; }
	$(PYTHON) scripts/export_gguf.py --model_path $(CKPT) --outtype $(or $(QUANT),f16) \
	    --output $(or $(OUT),checkpoints/gguf/$(subst /,-,$(patsubst checkpoints/%,%,$(patsubst %/,%,$(CKPT))))-$(or $(QUANT),f16).gguf) $(ARGS)

# ---------------------------------------------------------------- GPU check and inference image
gpu-check: ## The prepared GPU check (≤ 8 min on one H100/H200) -> OUT/gpu_check.json; DRY_RUN=1 only plans
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=gpu-check [DRY_RUN=1] [ARGS='--no-install --parts gpu_tests']"; exit 2; }
	bench/gpu_check.sh $(OUT) $(if $(filter-out 0,$(DRY_RUN)),--dry-run) $(ARGS)

docker-build: ## Build the inference image IMAGE (mini-llm-serve): CUDA runtime, pinned requirements, non-root
	docker build -t $(IMAGE) .

docker-run: ## Serve CKPT=<self-contained checkpoint> from the image on 127.0.0.1:8000; needs SERVE_API_KEY
	@test -n "$(CKPT)" || { echo "usage: SERVE_API_KEY=<key> make docker-run CKPT=checkpoints/sft/small/merged"; exit 2; }
	@test -n "$$SERVE_API_KEY" || { echo "set SERVE_API_KEY: in the container the server listens on 0.0.0.0, which needs a key"; exit 2; }
	docker run --rm --gpus all -p 127.0.0.1:8000:8000 -e SERVE_API_KEY -v "$(abspath $(CKPT)):/model:ro" $(IMAGE) $(ARGS)

bench: ## The quick benchmarks (prepare, pretrain, serve) -> bench/results/*.json; bench-quality runs on its own
	$(MAKE) --no-print-directory bench-prepare ARGS=
	$(MAKE) --no-print-directory bench-pretrain ARGS=
	$(MAKE) --no-print-directory bench-serve ARGS=

bench-prepare: ## Stage 01 throughput (MB/s) against tokenisation alone
	$(PYTHON) bench/bench_prepare.py $(ARGS)

bench-pretrain: ## Pretraining tokens/s and MFU of the tiny preset against a plain PyTorch loop
	$(PYTHON) bench/bench_pretrain.py $(ARGS)

bench-serve: ## Decode tokens/s against model.generate(), and API throughput with 1/4/8 clients
	$(PYTHON) bench/bench_serve.py $(ARGS)

bench-quality: ## Validation bits per byte of each pretraining recipe at an equal time budget (~45 min on CPU)
	$(PYTHON) bench/bench_quality.py $(ARGS)

# ---------------------------------------------------------------- operations
monitor: ## Live GPU view (nvidia-smi) or CPU/memory view, plus the newest metrics.jsonl row
	$(PYTHON) scripts/monitor.py $(ARGS)

checkpoints: ## List checkpoints with step, loss, size and date
	$(PYTHON) scripts/checkpoints.py list

archive-checkpoint: ## Archive CKPT=<dir> into backups/<name>-<date>.tar.gz
	@test -n "$(CKPT)" || { echo "usage: make archive-checkpoint CKPT=checkpoints/pretrain/tiny/final"; exit 2; }
	$(PYTHON) scripts/checkpoints.py archive $(CKPT)

cleanup-checkpoints: ## Keep the newest KEEP step_N checkpoints of STAGE (default pretrain; final/best/latest kept)
	$(PYTHON) scripts/checkpoints.py cleanup --stage $(or $(STAGE),pretrain) --keep $(KEEP)

disk-usage: ## Sizes of data/ and checkpoints/
	$(PYTHON) scripts/checkpoints.py disk-usage

backup: ## config/ plus every stage's latest checkpoint (or CKPT=…) into backups/backup-<date>.tar.gz
	$(PYTHON) scripts/checkpoints.py backup $(CKPT)

clean: ## Remove caches, run outputs and reports (keeps data/ and checkpoints/)
	rm -rf .pytest_cache runs reports evaluation_results bench/results
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +

clean-checkpoints: ## Delete checkpoints/ (asks first unless FORCE=1)
	@if [ "$(FORCE)" != "1" ]; then read -r -p "Delete checkpoints/ ($$(du -sh checkpoints 2>/dev/null | cut -f1))? [y/N] " ok; \
	    [ "$$ok" = "y" ] || { echo "kept"; exit 0; }; fi; rm -rf checkpoints && echo "checkpoints/ deleted"
