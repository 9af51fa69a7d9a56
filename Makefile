# The two commands of the README. Both install what they need first (idempotent, see scripts/install.sh).
.PHONY: demo test install

install:
	@bash scripts/install.sh

demo: install
	.venv/bin/orchestrate demo

test: install
	.venv/bin/python -m pytest
