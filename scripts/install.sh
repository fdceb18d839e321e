#!/usr/bin/env bash
# Install ckptd with its test extras on a fresh machine. The CPU torch wheel is
# pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e ".[test]"
python -m pip install --quiet --disable-pip-version-check "torchdata==0.11.0"  # StatefulDataLoader tests
