#!/usr/bin/env bash
# Creates .venv (if missing) and installs sinkscope with every extra, pinned by constraints.txt.
# Idempotent: a second run with nothing changed takes a few seconds (stamp file below).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SINKSCOPE_VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.sinkscope-installed"
want=$(cat pyproject.toml constraints.txt scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
# openai-clip (ImageReward's need) still imports pkg_resources: keep setuptools < 81
$PIP install -q --upgrade "pip>=24" "setuptools<81" wheel
$PIP install -q -c constraints.txt -e ".[all]"
# image-reward 1.5 pins timm==0.6.13 and old transformers helpers: install it alone, without its pins
$PIP install -q --no-deps "image-reward==1.5"
echo "$want" > "$STAMP"
echo "sinkscope installed in $VENV"
