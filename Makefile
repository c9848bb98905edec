# Two commands on a fresh machine (torch 2.13.0 CPU first, see DEVELOPERS.md):
#   make demo   compile a zoo MoE LM for ONNX Runtime, run it, verify it against eager PyTorch
#   make test   ruff (lint + format check) and the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MOEC := $(VENV)/bin/moec
DEMO_MODEL ?= zoo:mixtral-lm
DEMO_OUT ?= demo-out

.PHONY: demo test install lint bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(MOEC) compile $(DEMO_MODEL) --target ort -o $(DEMO_OUT) --force
	$(PY) -c "import moec, numpy as np; m = moec.load('$(DEMO_OUT)'); \
	ids = np.random.default_rng(0).integers(0, 256, (1, 12)); \
	logits = m(ids); print('logits', logits.shape, 'next tokens', logits[0].argmax(-1)); \
	print('generated with the KV cache', m.generate(ids, max_new_tokens=8)[0, 12:])"
	$(MOEC) verify $(DEMO_OUT)

lint: install
	$(VENV)/bin/ruff check moec tests bench
	$(VENV)/bin/ruff format --check moec tests bench

test: lint
	$(VENV)/bin/pytest -n auto

bench: install
	$(PIP) install -q -e '.[dev,bench]'
	$(PY) bench/moe_layer.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
