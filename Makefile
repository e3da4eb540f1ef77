# The README's commands. Run as root on Debian/Ubuntu; `make setup` is idempotent.
VENV := .venv
PYTHON := $(VENV)/bin/python
# The default audit also checks the kernel read-only against the built-in trading-latency profile
# (the `kernel` table and its findings; nothing is changed) and writes report.html into the bundle.
AUDIT_ARGS ?= --duration 10 --profile trading-latency

.PHONY: setup audit test bench deb clean

setup:
	@bash packaging/setup.sh

audit: setup
	$(VENV)/bin/guardian-agent audit $(AUDIT_ARGS)

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider --durations=20 tests

bench: setup
	$(PYTHON) benchmarks/run_all.py

deb: setup
	bash packaging/build-deb.sh

clean:
	rm -rf $(VENV) build dist *.egg-info guardian-reports .pytest_cache
