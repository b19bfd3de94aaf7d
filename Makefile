# The README's two commands: `make run` and `make test`.
# Both build .venv with a Python 3.10 interpreter (lava-nc 0.10 supports no other)
# and install the project with its dev extras in one pip resolver run.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    := out

.PHONY: run test lint bench bench-imagenet bench-all clean

run: $(STAMP)
	$(VENV)/bin/neurodeploy deploy digits_cnn --profile loihi2 --backend lava --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The small part (under 3 minutes): kernels against their GEMMs, save/load, backends.
bench: $(STAMP)
	$(PY) benchmarks/bench_limit.py
	$(PY) benchmarks/bench_reference.py
	$(PY) benchmarks/bench_backends.py

# VGG-16 and ResNet-18 at 224x224 against their GEMMs (several minutes on 2 cores).
bench-imagenet: $(STAMP)
	$(PY) benchmarks/bench_limit.py --only vgg16
	$(PY) benchmarks/bench_limit.py --only resnet18
	$(PY) benchmarks/bench_limit.py --peak vgg16 --images 64 --what forward

bench-all: bench bench-imagenet
	$(PY) benchmarks/bench_lava.py
	$(PY) benchmarks/bench_sweep.py

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
