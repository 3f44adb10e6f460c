# Every target installs into a project-local .venv first (idempotent), so each one works from a fresh clone.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python jobs/ablation.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python bench/assigner.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/accuracy.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/eval.py
	$(BIN)/python bench/annotation_index.py
	$(BIN)/python bench/input_pipeline.py
	$(BIN)/python bench/footprint.py
	$(BIN)/python bench/allocator.py

clean:
	rm -rf $(VENV) mlruns mlflow.db ray_results .pytest_cache
