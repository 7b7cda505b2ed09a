#!/usr/bin/env bash
# Download the wheels the GPU run carries to a machine without network (into .whl/, which
# git ignores): Liger-Kernel and TRL (timing peers) and the needs of TRL the CUDA image lacks,
# bm25s for the trainer tests. For CPython 3.12 on x86-64 Linux.
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  liger-kernel==0.8.5 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bm25s==0.3.16
ls -la .whl
