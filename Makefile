# zeus-qupath: `make demo` installs and runs the offline demo; `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= zeus-demo

.PHONY: install demo test test-fast lint bench clean extension

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,paquo,conch,plip,ray]'
	touch $@

# the demo needs the package only: no test tools, Ray, paquo or CONCH (a full install also serves)
$(VENV)/.installed-demo: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -f $(VENV)/.installed || { $(BIN)/python -m pip install -q --upgrade pip && \
		$(BIN)/python -m pip install -q -e .; }
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/zeus demo --out $(DEMO_OUT)

test: install
	$(BIN)/python -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$status

# the inner loop: no model fits, JVMs or QuPath windows (markers in pyproject.toml)
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not jvm and not gui"; status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests"; exit 1; fi; exit $$status

# the QuPath extension jar (javac + jar; QUPATH_APP_DIR=<your QuPath>/lib/app to build against your QuPath)
extension:
	bash bridge/extension/build.sh

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
