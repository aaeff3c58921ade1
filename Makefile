# The two commands of the README. Each one sets the machine up first (idempotent).
VENV ?= .venv
RUN_DIR ?= runs/demo-$(shell date +%Y%m%d-%H%M%S)

.PHONY: setup demo test

setup:
	bash scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/laasp-dist prune resnet56 --criterion fpgm --flops-reduction 0.5 --out $(RUN_DIR)/final

test: setup
	RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1 $(VENV)/bin/python -m pytest -q
