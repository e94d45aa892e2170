#!/usr/bin/env bash
# An offline SGLang site for a GPU host without network access: SGLang 0.5.17 and
# everything it imports beyond torch 2.11 (CUDA 13) and the host's base packages,
# as wheels installed into one folder, packed as xz parts small enough to send.
#
#   bash deploy/sglang-bundle.sh OUTDIR [PART_MIB]   # on a machine with the package index
#
# writes OUTDIR/sgl.0, sgl.1, ... (PART_MIB each at most, default 48; about 141 MiB
# in all). On the GPU host:
#
#   cat sgl.* | xz -d | tar x -C /opt        # -> /opt/site312
#   export PYTHONPATH=/opt/site312            # beside the host's torch 2.11
#   pip install --no-build-isolation kvcached-0.1.6.tar.gz   (builds against that torch)
#
# kvcached must go into the interpreter's own environment, not a PYTHONPATH folder:
# its kvcached_autopatch.pth is read only from site-packages (installed with --target,
# copy that file there), or kvcached patches nothing, silently. The pins are
# deploy/sglang-0.5.17-requirements.txt (Python 3.12, x86_64, manylinux). The
# kernel wheel's FA3 library (flash_ops, 1 GB unpacked) is left out: start SGLang
# with --attention-backend triton or flashinfer. bench/sglang_gpu.sh runs the
# SGLang tests from these parts on the lent GPU machine.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: sglang-bundle.sh OUTDIR [PART_MIB]}"
part_mib="${2:-48}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"
platforms=()
for minor in $(seq 5 39); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        "${platforms[@]}")
# posix-ipc comes with kvcached's own install on the host.
grep -v '^posix-ipc' "$here/sglang-0.5.17-requirements.txt" > "$work/requirements.txt"
python3 -m pip download -q --no-deps "${target[@]}" -d "$work/wheels" -r "$work/requirements.txt"
python3 -m pip install -q --no-deps --no-index --no-compile --ignore-requires-python "${target[@]}" \
  --target "$work/site312" "$work"/wheels/*.whl
rm -f "$work"/site312/sgl_kernel/flash_ops*.so
tar cf - -C "$work" site312 | xz -T2 -6 | split -b "${part_mib}M" -d -a 1 - "$out/sgl."
ls -la "$out"
