# Two commands do everything: `make demo` and `make test`. Each creates .venv when missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench bench-q8 bench-kquants clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ideoquant demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q

bench: bench-q8 bench-kquants

bench-q8: $(STAMP)
	$(PY) bench/bench_convert.py --format q8_0

bench-kquants: $(STAMP)
	$(PY) bench/bench_kquants.py

clean:
	rm -rf demo_out bench_out .pytest_cache
