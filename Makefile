# Convenience targets; each is the README's command.
PYTHON ?= python

.PHONY: install test quickstart
install:
	$(PYTHON) -m pip install -e ".[dev]" -c constraints.txt
test:
	$(PYTHON) -m pytest
quickstart:
	bigmodel pipeline -c configs/quickstart.yaml
