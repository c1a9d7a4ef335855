#!/usr/bin/env bash
# Serve the packaged SmolLM2-135M-Instruct as an OpenAI-compatible server (vLLM, CPU build) on
# 127.0.0.1, in the foreground, until stopped (SIGTERM or Ctrl-C shut it down cleanly).
#
#   bash scripts/serve_llm.sh [PORT] [extra vLLM flags...]
#   curl http://127.0.0.1:PORT/v1/models      # model name: smollm2-135m-instruct
#
# Install first with scripts/install_llm_server.sh. Environment: VLSELECT_LLM_VENV,
# VLSELECT_LLM_DIR (as for the install script), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, default 1),
# VLSELECT_LLM_COMPILE=1 to let vLLM torch.compile the model (off by default: 3-4 minutes more at
# each start on 2 cores, as its compile cache did not load back here - "Compiling model again due
# to a load failure" - and one request was no faster per token than eager).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLSELECT_LLM_VENV:-$ROOT/.venv-llm}"
MODEL_DIR="${VLSELECT_LLM_DIR:-$HOME/.cache/vlselect/smollm2-135m-instruct-hf}"
PORT="${1:-8000}"
shift || true

if [ ! -x "$VENV/bin/python" ] || [ ! -f "$MODEL_DIR/config.json" ]; then
    echo "serve_llm: no LLM server installed ($VENV, $MODEL_DIR): run bash scripts/install_llm_server.sh" >&2
    exit 2
fi

EAGER=(--enforce-eager)
if [ "${VLSELECT_LLM_COMPILE:-0}" = "1" ]; then EAGER=(); fi

# No hub and no usage reports: everything is local. VLLM_TARGET_DEVICE=cpu picks the CPU platform
# even where a GPU is visible.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_TARGET_DEVICE=cpu
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"

echo "serve_llm: vLLM (vllm-cpu) on http://127.0.0.1:$PORT/v1, model smollm2-135m-instruct from $MODEL_DIR" >&2
# `vllm serve` itself fails in vllm-cpu 0.32 (its CLI asks importlib.metadata for a distribution
# named "vllm", which is installed as "vllm-cpu"); the API server module takes the same flags.
exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL_DIR" \
    --served-model-name smollm2-135m-instruct \
    --host 127.0.0.1 --port "$PORT" \
    --dtype float32 \
    --max-model-len 2048 \
    "${EAGER[@]}" \
    "$@"
