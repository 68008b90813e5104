#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for benchmarks/gpu_check.sh on a lent GPU machine that has no
# network: packages its image lacks (lm-eval and what it imports, datasets, bitsandbytes),
# unpacked for Python 3.12 into .gpu/site (~14 MB: bitsandbytes keeps only its CUDA 13.0 and CPU
# libraries, lm-eval only its wmdp and mmlu task folders), and the Mistral tokenizer in .gpu/tok
# (the image has no mistral_common). Run here, from the repository root, then carry ".gpu".
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu/whl .gpu/site
mkdir -p .gpu/whl .gpu/site
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do plat+=(--platform "$p"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .gpu/whl lm-eval==0.4.13 datasets==5.2.0 dill==0.4.1 evaluate==0.4.6 \
  multiprocess==0.70.19 pytablewriter==1.2.1 DataProperty==1.1.1 mbstrdecoder==1.1.5 \
  pathvalidate==3.3.1 tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 more_itertools==11.2.1 \
  bitsandbytes==0.50.2
(cd .gpu/whl && python3 -m pip wheel -q --no-deps sqlitedict==2.1.0 word2number==1.1)
for w in .gpu/whl/*.whl; do unzip -q -o "$w" -d .gpu/site; done
rm -rf .gpu/whl
cd .gpu/site
rm -f bitsandbytes/libbitsandbytes_cuda1[12]*.so bitsandbytes/libbitsandbytes_cuda132.so \
      bitsandbytes/libbitsandbytes_rocm*.so bitsandbytes/libbitsandbytes_xpu*.so
(cd lm_eval/tasks && for d in */; do case "$d" in wmdp/|mmlu/) ;; *) rm -rf "$d" ;; esac; done)
rm -f lm_eval-*.dist-info/RECORD
cd ../..
python3 -c "from wmdp_fast.testing import save_mistral_tokenizer as s; s('.gpu/tok')"
du -sh .gpu
