# The two set-up commands of the README: `make demo` and `make test` (each installs first,
# from constraints/cpu.lock). `make lock` refreshes the locks; `make test-latest` runs the
# fast suite on the newest versions the ranges allow (docs/dependencies.md).
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install demo test test-all test-latest lint lock
install:
	bash scripts/install.sh

demo: install
	vlselect demo

test: install
	ruff check . && ruff format --check . && pytest -q

test-all: install
	pytest -q -m "not gpu"

test-latest: install
	bash scripts/test_latest.sh

lint: install
	ruff check . && ruff format --check .

lock: install
	bash scripts/lock.sh
