#!/usr/bin/env bash
# Regenerate the locks from pyproject.toml and constraints/*.txt|in (`make lock`).
# Never edit constraints/*.lock by hand: change a range or a pin, then run this.
#
#   constraints/gpu.lock  GPU cluster nodes: the project with [dev,gpu], torch 2.14.0 (vLLM's).
#   constraints/cpu.lock  laptops, CI, CPU nodes: the project with [dev], torch 2.14.1; every
#                         package both sets share is held at the GPU lock's version, so what
#                         the CPU tests pass on is what a GPU node runs.
# Both target CPython 3.11 on x86_64 Linux (manylinux_2_28), with hashes of every wheel.
# Resolution asks the package index for the newest versions the ranges allow; the locks
# move only when this runs. `make test-latest` shows what moving them would change.
set -euo pipefail
cd "$(dirname "$0")/.."
UV=${UV:-.venv/bin/uv}
[ -x "$UV" ] || UV=$(command -v uv) || { echo "lock.sh: no uv; run 'make install' first (uv is in the dev extra)" >&2; exit 2; }
TARGET=(--python-version 3.11 --python-platform x86_64-manylinux_2_28)
COMMON=(pyproject.toml constraints/packaged.in --overrides constraints/overrides.txt
        --generate-hashes --quiet "${TARGET[@]}")
export UV_CUSTOM_COMPILE_COMMAND="make lock"

"$UV" pip compile "${COMMON[@]}" --extra dev --extra gpu \
    --constraints constraints/gpu.txt --overrides constraints/overrides-gpu.txt \
    --output-file constraints/gpu.lock

# The GPU lock's versions as constraints for the CPU set, less the torch family it pins apart.
shared=$(mktemp)
trap 'rm -f "$shared"' EXIT
grep -E '^[A-Za-z0-9._-]+==' constraints/gpu.lock | sed 's/ .*//' |
    grep -vE '^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+|cuda-[a-z-]+)==' > "$shared"
"$UV" pip compile "${COMMON[@]}" --extra dev \
    --constraints constraints/cpu.txt --constraints "$shared" \
    --output-file constraints/cpu.lock
sed -i "s|$shared|<the GPU lock's shared versions>|" constraints/cpu.lock
echo "locked: constraints/cpu.lock ($(grep -cE '^[a-z0-9]' constraints/cpu.lock) packages)," \
     "constraints/gpu.lock ($(grep -cE '^[a-z0-9]' constraints/gpu.lock) packages)"
