#!/usr/bin/env bash
# Install, then run the whole test suite (real SeaweedFS, real processes, real signals): about 10 minutes.
# pytest prints a line per test file as it goes and, at the end, the slowest tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
printf '\n== test: pytest (one line per file; the 15 slowest tests at the end)\n'
python -m pytest --durations=15 "$@"
