# The README's two commands: `make run` and `make test`.
# Both build .venv with a Python 3.10 interpreter (lava-nc 0.10 supports no other)
# and install the project with its dev extras in one pip resolver run.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    := out

.PHONY: run test lint bench clean

run: $(STAMP)
	$(VENV)/bin/neurodeploy deploy digits_cnn --profile loihi2 --backend lava --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) benchmarks/bench_reference.py
	$(PY) benchmarks/bench_backends.py
	$(PY) benchmarks/bench_lava.py
	$(PY) benchmarks/bench_sweep.py
	$(PY) benchmarks/bench_alpha1.py

$(PY):
	@py="$$(tools/find_python310.sh)" || exit 1; \
	echo "creating $(VENV) with $$py"; \
	"$$py" -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache *.egg-info
