#!/usr/bin/env bash
# Every GPU-only test file in one call on the GPU machine, and its dated record (bench/gpu_tests.py):
#   source .device/setup-kvcached.sh .device; bash bench/gpu_tests.sh $OUT/gpu_tests-h100.json
exec python3 "$(dirname "$0")/gpu_tests.py" --out "${1:?where the record goes (JSON)}"
