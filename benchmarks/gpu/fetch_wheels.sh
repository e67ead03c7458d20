#!/usr/bin/env bash
# Wheels that benchmarks/gpu/run.sh needs on the GPU machine and that its image lacks
# (the image has jax, flax, optax, orbax, torch, safetensors, huggingface-hub; it cannot reach
# a package index). Run here, in the repository root, once per checkout; .whl/ is git-ignored
# and travels with `carry: [".whl"]`. The machine's Python is 3.12.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl ml-collections==1.1.0 diffusers==0.42.1 importlib-metadata==10.2.0
ls -l .whl
