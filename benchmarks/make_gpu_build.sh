#!/usr/bin/env bash
# Prebuilds wmdp_fast._C with CUDA for the lent GPU's image (Python 3.12, torch 2.11.0+cu130,
# sm_90), here on the development machine, into .gpu/prebuilt/ (git-ignored, carried with
# ".gpu"). benchmarks/gpu_check.sh then skips its build step (60-120 s of the session's 15
# minutes) when the prebuilt extension was made from exactly the current setup.py and csrc/
# (benchmarks/ext_source_hash.py), imports, and reports CUDA; otherwise it builds as before.
#
# Needs: python3.12 (pyenv here), nvcc 13.0 (/usr/local/cuda-13.0), network to PyPI the first
# time (torch 2.11.0 from PyPI is the +cu130 build; with its CUDA libraries ~5 GB, in
# $GPU_BUILD_VENV, default /tmp/v312). Run from anywhere; takes ~1.5 min on 2 cores once the
# venv exists. The build runs in a copy of the working tree, never in place.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${GPU_BUILD_VENV:-/tmp/v312}
TORCH=2.11.0
PY312=${PY312:-$(command -v python3.12 || true)}
[ -n "$PY312" ] || { echo "make_gpu_build.sh: needs python3.12" >&2; exit 1; }
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__ != '$TORCH+cu130')" 2>/dev/null; then
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH" pybind11 ninja setuptools wheel numpy
fi
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "make_gpu_build.sh: no nvcc in $CUDA_HOME/bin" >&2; exit 1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# the working tree as the device tool copies it: tracked files and untracked, non-ignored ones
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$TMP"
(cd "$TMP" && WMDP_FAST_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" MAX_JOBS="$(nproc)" CUDA_HOME="$CUDA_HOME" \
  "$VENV/bin/python" setup.py -q build_ext --inplace >"$TMP/build.log" 2>&1) \
  || { tail -30 "$TMP/build.log" >&2; exit 1; }
"$VENV/bin/python" -c "
import sys, torch
sys.path.insert(0, '$TMP')
import wmdp_fast._C as c
assert c.with_cuda(), 'built without CUDA'
"
mkdir -p .gpu/prebuilt
rm -f .gpu/prebuilt/*
cp "$TMP"/wmdp_fast/_C.cpython-312-*.so .gpu/prebuilt/
python3 benchmarks/ext_source_hash.py "$TMP" > .gpu/prebuilt/sources.sha256
echo "$TORCH+cu130 sm_90 $("$CUDA_HOME/bin/nvcc" --version | tail -1)" > .gpu/prebuilt/built_for.txt
ls -la .gpu/prebuilt
cat .gpu/prebuilt/built_for.txt
