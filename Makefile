# Two entry points: `make demo` (main job on built-in data) and `make test`.
# Both create .venv idempotently: it is rebuilt only when requirements.txt or setup.py change.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DDS discovery must never leave loopback.
export ROS_AUTOMATIC_DISCOVERY_RANGE := LOCALHOST
export ROS_LOCALHOST_ONLY := 1
export RMW_IMPLEMENTATION := rmw_fastrtps_cpp

.PHONY: demo test venv system-deps clean

demo: $(STAMP)
	$(BIN)/coop-perception demo --out out/demo

test: $(STAMP)
	$(BIN)/python -m pytest -ra tests

venv: $(STAMP)

system-deps:
	@# open3d needs libusb at import time.
	@ldconfig -p | grep -q 'libusb-1.0.so.0' || { \
	  echo "installing libusb-1.0-0 (needed by open3d)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libusb-1.0-0 >/dev/null; }

$(STAMP): requirements.txt setup.py | system-deps
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

clean:
	rm -rf $(VENV) build install log out
