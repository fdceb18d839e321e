#!/usr/bin/env bash
# Install, then run the whole test suite (real SeaweedFS, real processes, real signals).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python -m pytest -q "$@"
