# The README's two commands: `make demo` and `make test`. Both install first, with the pip of the
# active interpreter (so an active virtualenv is respected).
PYTHON ?= python
PIP := $(PYTHON) -m pip
DEMO_OUT ?= runs/demo

.PHONY: install demo test test-all test-browser reference-impls

install:
	$(PIP) install "torch==2.14.1" "torchvision==0.29.1"
	# the eval extra (lmms-eval) too: its adapter test is part of `make test`
	$(PIP) install -e ".[test,eval]"
	# torchscale 0.3.0 pins timm==0.6.13 / fairscale==0.4.0, which clash with open_clip 3.x;
	# it runs on timm 1.x, so install fairscale normally and torchscale without its pins.
	$(PIP) install fairscale
	$(PIP) install --no-deps "torchscale==0.3.0"

demo: install
	$(PYTHON) -m vlm run configs/demo/llava_shapes.yaml --out $(DEMO_OUT)

test: install reference-impls
	$(PYTHON) -m pytest

test-all: install
	$(PYTHON) -m pytest -m ""

# The web page of `vlm serve` in a real headless browser: Debian's chromium and its driver
# (system packages, so this target has its own line in the README), selenium from PyPI.
test-browser: install
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver
	$(PIP) install -e ".[browser]"
	VLM_REQUIRE_BROWSER=1 $(PYTHON) -m pytest -m browser tests/test_serve_browser.py

# Official reference implementations (VQAEval, EvalAIAnswerProcessor) that the metric tests compare
# against. Installed without dependencies: the tests load single files from them by path.
REFERENCE_DIR := build/reference
reference-impls:
	@if [ -f $(REFERENCE_DIR)/lavis/common/vqa_tools/vqa_eval.py ] && \
	    [ -f $(REFERENCE_DIR)/mmf/utils/m4c_evaluators.py ]; then \
		echo "reference implementations already in $(REFERENCE_DIR)"; \
	else \
		$(PIP) install --no-deps --target $(REFERENCE_DIR) "salesforce-lavis==1.0.2" "mmf==1.0.0rc10"; \
	fi
