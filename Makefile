# Two commands do everything: `make demo` and `make test`. Each builds .venv itself.
# `make docs` builds the documentation site into site/ (warnings are errors).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
NP ?= 4
# Test files run on this many pytest workers (pytest-xdist), a file's tests on one worker: most of a job's time
# is process start-up and waiting, so two workers keep a 2-core machine busy.
TEST_WORKERS ?= 2
STAMP := $(VENV)/.installed

.PHONY: demo test test-full docs install clean

# constraints.txt pins what this project's own installs take (a torch build that is quick to get here);
# users of the package inherit no upper bound.
$(STAMP): pyproject.toml setup.py collective/_stream.c constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[mpi,test,trainer,bench,torch,jax,docs]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/collective-run -n $(NP) $(BIN)/python examples/train_digits.py
	$(BIN)/collective-run -n $(NP) $(BIN)/python examples/allreduce_demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -m "not slow" -n $(TEST_WORKERS) --dist loadfile tests

# Everything, the slow cases too (a 2^31-element allreduce: minutes and about 10 GiB).
test-full: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile tests

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache site build collective/*.so
