# Two commands do everything: `make demo` and `make test`. Each creates .venv when missing.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench bench-q8 bench-q4k bench-nf4 bench-kquants bench-runtime bench-int8 bench-int8-cost bench-calibrated bench-q3k-mix bench-speed clean

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

# Benchmarks (not part of the tests): whole-process conversion of a full-width 2-block
# synthetic checkpoint, encoder throughput, runtime load/step times, INT8 recipe errors.
bench: bench-q8 bench-q4k bench-nf4 bench-kquants bench-runtime bench-int8

bench-q8: $(STAMP)
	$(PY) bench/bench_convert.py --format q8_0

bench-q4k: $(STAMP)
	$(PY) bench/bench_convert.py --format q4_k

bench-nf4: $(STAMP)
	$(PY) bench/bench_convert.py --format nf4

bench-speed: $(STAMP)
	$(PY) bench/speed_table.py --work bench_out --ggml ../shared/tools/libggml-base.so

bench-kquants: $(STAMP)
	$(PY) bench/bench_kquants.py --repeat 2 --ggml ../shared/tools/libggml-base.so

bench-q3k-mix: $(STAMP)
	$(PY) bench/kquant_mix_sensitivity.py --seed 0 --layers 4
	$(PY) bench/kquant_mix_sensitivity.py --seed 7 --layers 6 --input-seed 555 --skip-kinds

bench-runtime: $(STAMP)
	$(PY) bench/bench_runtime.py --steps 30

bench-int8: $(STAMP)
	$(PY) bench/int8_errors.py --layers 8 --threads 1 --out bench_out/int8_errors

bench-calibrated: $(STAMP)
	$(PY) bench/bench_calibrated_convert.py --work bench_out

bench-int8-cost: $(STAMP)
	$(PY) bench/int8_rounding_cost.py --threads 2

clean:
	rm -rf demo_out bench_out .pytest_cache
