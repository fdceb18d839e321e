#!/usr/bin/env bash
# The main job: a training run that is SIGKILLed mid-run and resumes from its snapshot.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python examples/demo.py "$@"
