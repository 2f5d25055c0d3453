# meshagent: `make demo` and `make test` work on a fresh Debian bookworm as root.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap demo test unit lint bench bench-scrape bench-footprint soak clean

bootstrap:
	scripts/bootstrap

demo: bootstrap
	$(VENV)/bin/meshagent demo

test: bootstrap
	$(PY) -m pytest tests -q

unit: bootstrap
	$(PY) -m pytest tests/unit -q

lint: bootstrap
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/ruff format --check agent tests bench

bench: bootstrap
	$(PY) bench/run.py

bench-scrape: bootstrap
	$(PY) bench/scrape.py

soak: bootstrap
	$(PY) bench/soak.py

bench-footprint: bootstrap
	$(PY) bench/footprint.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
