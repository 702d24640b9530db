# RadLens: `make demo` and `make test` work on a fresh machine (Python 3.10+, no GPU needed).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint typecheck pytest bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first and pinned: the constraints file keeps pip on the local CPU wheel, so no
	# CUDA/nvidia packages are ever pulled onto a CPU machine.
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/radlens demo --out data/demo

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck pytest

# Performance scripts: each prints JSON (and writes benchmarks/out/); minutes, not seconds.
bench: $(STAMP)
	$(BIN)/python benchmarks/index_search.py
	$(BIN)/python benchmarks/encode_throughput.py
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/allocator.py
	$(BIN)/python benchmarks/channels_last.py
	$(BIN)/python benchmarks/phantom_cxr_speed.py
	$(BIN)/python benchmarks/phantom_ct_speed.py
	$(BIN)/python benchmarks/real_ct.py
	$(BIN)/python benchmarks/app_search_latency.py
	$(BIN)/python benchmarks/grounding_latency.py
	$(BIN)/python benchmarks/ingest_throughput.py --keep-index build/bench_index
	$(BIN)/python benchmarks/search_precision.py --index build/bench_index
	# needs Debian orthanc + orthanc-dicomweb (apt-get install orthanc orthanc-dicomweb)
	$(BIN)/python benchmarks/dicomweb_ingest.py
	$(BIN)/python benchmarks/dicomweb_latency.py
	$(BIN)/python benchmarks/sharded_build.py
	$(BIN)/python benchmarks/erase_cost.py
	test -f data/phantom_ct/manifest.jsonl || $(BIN)/radlens data phantom-ct --out data/phantom_ct --n 300
	$(BIN)/python benchmarks/volume_retrieval.py --data data/phantom_ct \
		--model lecl-small=checkpoints/lecl-small --model random=random:lecl-small@0
	$(BIN)/python benchmarks/volume_retrieval.py --data data/phantom_ct --splits test \
		--model lesion-seg=checkpoints/lesion-seg --model lecl-small=checkpoints/lecl-small \
		--out benchmarks/out/test_split

clean:
	rm -rf $(VENV) build data/demo .pytest_cache .mypy_cache .ruff_cache
