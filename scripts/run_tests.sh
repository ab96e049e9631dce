#!/usr/bin/env bash
# The README's test command: installs the project with its pinned test dependencies, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -r requirements-ci.txt
python -m pytest tests -q "$@"
