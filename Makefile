# The two commands of the README. Each one sets the machine up first (idempotent).
VENV ?= .venv
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test

setup:
	bash scripts/bootstrap.sh

demo: setup
	RAY_USAGE_STATS_ENABLED=0 $(VENV)/bin/laasp-dist run jobs/demo.yaml --out $(RUN_DIR)

test: setup
	RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 $(VENV)/bin/python -m pytest -q
