#!/usr/bin/env bash
# Runs every test of the workspace: `tools/test.sh [extra cargo test args]`.
#
# The face crate runs real ONNX models through ONNX Runtime, which `ort` loads at run time
# (feature `load-dynamic`, see README). When ORT_DYLIB_PATH is not set, this script installs
# the runtime from PyPI's onnxruntime wheel into .venv-ort (once) and points ORT_DYLIB_PATH at it.
set -euo pipefail
cd "$(dirname "$0")/.."

ORT_VERSION=1.32.0
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
    venv=.venv-ort
    lib=$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* 2>/dev/null | head -n1 || true)
    if [ -z "$lib" ]; then
        echo "tools/test.sh: installing onnxruntime==$ORT_VERSION into $venv (once)" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "onnxruntime==$ORT_VERSION"
        lib=$(ls "$venv"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n1)
    fi
    ORT_DYLIB_PATH=$(realpath "$lib")
    export ORT_DYLIB_PATH
fi

cargo test --workspace "$@"
