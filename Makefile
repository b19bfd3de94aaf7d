# The README's two commands: `make run` and `make test`.
# Both build .venv with a Python 3.10 interpreter (lava-nc 0.10 supports no other)
# and install the project with its dev extras in one pip resolver run.

VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    := out

# The browser test (tests/test_crosscheck.py) renders the reports in Debian's chromium.
CHROMIUM_PACKAGES := chromium fonts-dejavu-core
CHROMIUM_COMMAND  := chromium

.PHONY: run test lint bench bench-imagenet bench-all clean browser

run: $(STAMP)
	$(VENV)/bin/neurodeploy deploy digits_cnn --profile loihi2 --backend lava --out $(OUT)

test: $(STAMP) browser
	$(PY) -m pytest -q

# Installs Debian's chromium for the browser test where it is missing and this is a
# machine of ours (root, apt-get: CI's fresh clones). About a minute, once per machine;
# apt-get is tried twice against a transient mirror failure. Where it cannot be
# installed (no root or no apt-get) it says so and the browser test is skipped; where
# the install is possible but fails, make stops: a browser test that silently skips in
# CI is the failure this step exists to prevent.
browser:
	@if command -v $(CHROMIUM_COMMAND) >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ]; then \
		echo "make: chromium is missing and needs root and apt-get to install" \
			"(apt-get install $(CHROMIUM_PACKAGES)); the browser test will be skipped" >&2; \
		exit 0; \
	fi; \
	echo "make: installing Debian's $(CHROMIUM_PACKAGES) for the browser test"; \
	for attempt in 1 2; do \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(CHROMIUM_PACKAGES) >/dev/null && exit 0; \
		sleep 10; \
	done; \
	echo "make: apt-get could not install $(CHROMIUM_PACKAGES)" >&2; exit 1

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The small part (under 3 minutes): kernels against their GEMMs, save/load, backends.
bench: $(STAMP)
	$(PY) benchmarks/bench_limit.py
	$(PY) benchmarks/bench_reference.py
	$(PY) benchmarks/bench_backends.py

# VGG-16, ResNet-18 and ResNet-50 at 224x224 against their GEMMs (ResNet-50 also: exact) (several minutes on 2 cores).
bench-imagenet: $(STAMP)
	$(PY) benchmarks/bench_limit.py --only vgg16
	$(PY) benchmarks/bench_limit.py --only resnet18
	$(PY) benchmarks/bench_limit.py --only resnet50
	$(PY) benchmarks/bench_resnet.py --arch resnet50 --images 1 --repeats 3
	$(PY) benchmarks/bench_limit.py --peak vgg16 --images 64 --what forward

bench-all: bench bench-imagenet
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
