#!/usr/bin/env bash
# Wheels for running the GPU benchmarks on a machine without internet that already has CUDA PyTorch
# (Python 3.12, x86-64 Linux): the libraries the benchmarks need at the versions the tests run with,
# downloaded here, carried there, installed there without an index.
#
#   bash benchmarks/offline_wheels.sh [DIR=.whl]                                  # here, with internet
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl \
#       && export PYTHONPATH=/tmp/site                                            # there
#   bash benchmarks/gpu_bench.sh; bash benchmarks/gpu_qlora.sh                    # there
#
# torch stays the machine's own (the benchmarks need CUDA PyTorch >= 2.4, not this project's CPU pin).
# Everything else that transformers, peft, trl and datasets import must already be there (numpy,
# safetensors, tokenizers, huggingface_hub, pyarrow, fsspec, ...): the list below is what a common
# CUDA image lacks or has at another version. bitsandbytes' wheel carries its CUDA libraries (~43 MB).
# huggingface_hub is NOT carried: 2.x imports httpx2 (+ httpcore2, truststore), which such images lack
# (they have 1.x and httpx), and transformers 5.24, datasets 5.2, peft and trl all accept hub >= 1.31.
set -euo pipefail
DIR=${1:-.whl}
PACKAGES=(transformers==5.24.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
          bitsandbytes==0.50.2 loralib==0.1.2 accelerate==1.15.0)
mkdir -p "$DIR"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$DIR" "${PACKAGES[@]}"
du -sh "$DIR"
ls "$DIR"
