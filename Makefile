# The two commands of the README:
#   make test   install what is missing, build the extension (incrementally), run the whole test suite
#   make demo   the same build, then the main job: `sdcore generate` on the embedded default model -> demo.png
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# diffusers (+ scipy, which its LMS scheduler imports, and peft, its LoRA backend) is the test oracle;
# hypothesis draws the property tests; fastapi + uvicorn (the serve extra) and httpx (FastAPI's test client)
# run the serve tests; ray[data]: sdcore batch's Ray engine runs on a local Ray in the tests; wheel: a new venv
# has none, and the editable install and the packaging tests build wheels.
TEST_DEPS := pytest hypothesis wheel ninja numpy diffusers scipy peft transformers safetensors pillow tqdm matplotlib fastapi uvicorn httpx "ray[data]"

.PHONY: all deps build test demo bench clean

all: build

# Everything is installed into the active Python environment, and only when missing.
deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch
	@$(PYTHON) -c "import pytest, hypothesis, wheel, ninja, numpy, diffusers, scipy, peft, transformers, safetensors, PIL, tqdm, matplotlib, fastapi, uvicorn, httpx, ray, ray.data" 2>/dev/null || \
		$(PIP) install $(TEST_DEPS)

# ninja rebuilds only what changed; the editable install (no compile) provides the `sdcore` command.
build: deps
	$(PYTHON) setup.py -q build_ext --inplace
	@SDCORE_SKIP_EXTENSION=1 $(PIP) install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "as the 'root' user" || true

test: build
	$(PYTHON) -m pytest -q tests

demo: build
	$(PYTHON) -m sdcore info
	$(PYTHON) -m sdcore generate "a photo of an astronaut riding a horse on the moon" --seed 0 --out demo.png --overwrite

bench: build
	$(PYTHON) bench/ops.py --device cpu

clean:
	rm -rf build sdcore/_C*.so *.egg-info
