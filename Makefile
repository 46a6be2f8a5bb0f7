# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= config.example.yaml

.PHONY: run test services check-config bench clean deb

# Running needs the daemon's own dependencies only; the test tools come with `make test`.
$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "eventrelay needs Python >= 3.11; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); echo "cannot make a virtualenv: on Debian/Ubuntu, apt install python3-venv" >&2; exit 1; }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

# Wheels of eventrelay's dependencies and build backend: the test that follows the README's systemd steps
# installs from them inside a container without network, as those steps would from PyPI.
BUILD_REQUIRES = $(shell $(PYTHON) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))")
$(VENV)/wheelhouse/.built: pyproject.toml $(VENV)/.installed
	$(PY) -m pip wheel --quiet --wheel-dir $(VENV)/wheelhouse . $(foreach r,$(BUILD_REQUIRES),'$(r)')
	@touch $@

run: $(VENV)/.installed
	@mkdir -p var
	$(VENV)/bin/eventrelay run --config $(CONFIG)

check-config: $(VENV)/.installed
	$(VENV)/bin/eventrelay check-config --config $(CONFIG)

# Debian's activemq and rabbitmq-server, which the tests start as real brokers, a JDK and systemd's tools
# (installed when root, with the brokers' own services kept from starting; otherwise the script prints the
# command to run).
services:
	sh .ci/install-services.sh

# pytest exits 5 when it collected no test: make treats any non-zero exit as failure, so that fails too.
test: $(VENV)/.installed-test $(VENV)/wheelhouse/.built services
	$(PY) -m pytest $(PYTEST_ARGS)

# dist/eventrelay_<version>-1_<arch>.deb: the daemon in a venv at /opt/eventrelay, the unit, its user, shell
# completions (packaging/build-deb.sh says how). Offline but for the wheelhouse; dpkg-dev and lintian come from
# apt (installed when root).
$(VENV)/.installed-deb: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[deb]'
	@touch $@

deb: $(VENV)/.installed-deb $(VENV)/wheelhouse/.built
	BUILD_PYTHON=$(PY) WHEELHOUSE=$(VENV)/wheelhouse sh packaging/build-deb.sh

bench: $(VENV)/.installed-test
	$(PY) bench/ingest.py
	$(PY) bench/deliver.py
	$(PY) bench/fanout.py

clean:
	rm -rf $(VENV) var .pytest_cache *.egg-info daemon/*.egg-info dist
