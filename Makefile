# Two commands a newcomer needs: `make train` and `make test`.
# Each creates .venv if missing and installs the project with the exact versions
# pinned in constraints.txt (pyproject.toml holds the ranges users get).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test train bench clean bench-per-sample docs

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -q

train: $(STAMP)
	$(PY) scripts/train_examples.py

bench: $(STAMP)
	$(PY) scripts/bench.py

# the API reference (Sphinx autodoc) and the pages of docs/ (myst-parser) as one site; warnings are errors
docs: $(STAMP)
	$(PY) -m sphinx -b html -W --keep-going docs docs/_build/html

clean:
	rm -rf $(VENV) lightning_logs .pytest_cache docs/_build

# per-sample gradients: ours against Opacus, torch.func and BackPACK. BackPACK declares
# torchvision, which it does not use: installed without its dependencies (einops, unfoldNd by hand).
bench-per-sample: $(STAMP)
	$(PY) -m pip install --quiet --no-deps -c constraints.txt backpack-for-pytorch einops unfoldnd
	$(PY) scripts/bench_per_sample.py
