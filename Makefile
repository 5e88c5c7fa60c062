# Benchmarks. `make bench` is the full generation benchmark: run it on an otherwise idle machine.
PY ?= .venv/bin/python
BENCH_ARGS ?=
QUICK_DIR ?= $(or $(TMPDIR),/tmp)/kvlens-bench

.PHONY: bench bench-quick bench-docs peer-venv

peer-venv:
	benchmarks/peers/make-peer-venv.sh

# kvlens, TransformerLens 2.18 and transformers 4.57.6 beside the floor (about 25 minutes on two
# cores), then the markdown report and the plot from its JSON.
bench: peer-venv
	$(PY) benchmarks/bench_generate.py $(BENCH_ARGS)
	$(PY) benchmarks/render_generate.py

# Smoke settings (not benchmark data): results, report and plot under $(QUICK_DIR).
bench-quick: peer-venv
	$(PY) benchmarks/bench_generate.py --quick --out $(QUICK_DIR)/generate_quick.json $(BENCH_ARGS)
	$(PY) benchmarks/render_generate.py --results $(QUICK_DIR)/generate_quick.json \
		--markdown $(QUICK_DIR)/generate_quick.md \
		--plot $(QUICK_DIR)/generate_quick.png

# The report and plot again from benchmarks/results/generate.json, without rerunning.
bench-docs:
	$(PY) benchmarks/render_generate.py
