# The two set-up commands of the README: `make demo` and `make test` (each installs first).
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install demo test test-all lint
install:
	bash scripts/install.sh

demo: install
	vlselect demo

test: install
	ruff check . && ruff format --check . && pytest -q

test-all: install
	pytest -q -m "not gpu"

lint: install
	ruff check . && ruff format --check .
