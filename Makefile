# Convenience targets; each is the README's command.
PYTHON ?= python

.PHONY: install test test-slow quickstart
install:
	$(PYTHON) -m pip install -e ".[dev]" -c constraints.txt
test:
	$(PYTHON) -m pytest -m "not slow"
test-slow:
	$(PYTHON) -m pytest -m slow
quickstart:
	bigmodel pipeline -c configs/quickstart.yaml
