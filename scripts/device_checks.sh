#!/usr/bin/env bash
# The book's CUDA checks, for a machine with an NVIDIA GPU and PyTorch (CI has none; see README, "GPU checks").
#   bash scripts/device_checks.sh MAMBA_SDIST OUT_DIR
# 1. builds mamba-ssm's selective_scan_cuda for this GPU from its source distribution (scripts/build_selective_scan.py);
# 2. runs the CUDA tests (tests/test_ssm.py, and the CUDA tests of tests/test_meepo.py);
# 3. runs the benchmarks (scripts/device_bench.py) into OUT_DIR, with a log.
# mamba-ssm's Python package comes from the same sdist; spconv is replaced by an import stub when it is missing (the
# CUDA checks use the mixers, not the sparse convolutions).
set -uo pipefail
sdist=$1; out=$2; mkdir -p "$out"
exec > >(tee "$out/device_checks.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
work=$(mktemp -d); tar xzf "$sdist" -C "$work" --strip-components=1
stubs=$(mktemp -d)
python3 -c "import spconv" 2>/dev/null || { mkdir -p "$stubs/spconv/pytorch"; touch "$stubs/spconv/__init__.py" "$stubs/spconv/pytorch/__init__.py"; }
export PYTHONPATH="$PWD:$work:$work/build:$stubs" PYTHONUNBUFFERED=1
time timeout 330 python3 scripts/build_selective_scan.py "$work" "$work/build" || echo "BUILD FAILED OR TIMED OUT"
python3 -c "import paperlab.ssm as s; print('mamba kernel available:', s.has_cuda_kernel())"
python3 -m pytest -q -p no:cacheprovider tests/test_ssm.py 2>&1 | tail -15
python3 -m pytest -q -p no:cacheprovider tests/test_meepo.py -k cuda 2>&1 | tail -15
python3 scripts/device_bench.py "$out"
