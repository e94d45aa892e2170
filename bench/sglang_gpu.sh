#!/usr/bin/env bash
# The SGLang path on a GPU machine without network access, in three device
# calls sent back to back (the lent machine goes back after 30 s idle, and a
# call carries at most 64 MiB: the offline SGLang site is three parts).
#
# Here, once (downloads about 230 MiB):
#   bash deploy/sglang-bundle.sh .sglang-bundle      # sgl.0 sgl.1 sgl.2
#   .sglang-min/: setup-kvcached.sh (builds kvcached from its sdist into /tmp/kvsite and
#     exports PYTHONPATH and LD_PRELOAD), the kvcached 0.1.6 sdist and the posix_ipc wheel,
#     and the aetcd, pytest-asyncio, grpcio-health-checking/-reflection 1.84 wheels
#   (both folders listed in .git/info/exclude)
# On the GPU machine, each call carrying the named paths:
#   1. carry .sglang-bundle/sgl.0:               bash bench/sglang_gpu.sh stash
#   2. carry .sglang-bundle/sgl.1:               bash bench/sglang_gpu.sh stash
#   3. carry .sglang-bundle/sgl.2, .sglang-min:  bash bench/sglang_gpu.sh run [STEP ...]
# `run` assembles the site into /tmp/site312 (once per machine), builds kvcached,
# puts kvcached's autopatch .pth into the interpreter's site-packages (a .pth on
# PYTHONPATH is not read: kvcached would then patch nothing, silently), and runs
# the STEPs (default: doctor tests activation), each writing under $OUT:
#   doctor      prism doctor --device cuda (kvcached maps a page, pinned bandwidth)
#   tests       tests/test_sglang_driver.py with the real server (a Llama-3.2-1B
#               config with dummy weights and the tiny tokenizer, Triton attention)
#   activation  bench/activation.py --engines sglang,builtin (1B, 3B, 8B)
# A later call on the same warm machine runs `run STEP` again without the parts.
set -uo pipefail
stage="${1:?usage: sglang_gpu.sh stash | run [doctor] [tests] [activation]}"
shift
parts=/tmp/sglang-parts
out="${OUT:-/tmp/sglang-out}"
mkdir -p "$parts" "$out"

if [ "$stage" = stash ]; then
  cp .sglang-bundle/sgl.* "$parts"/ && ls -la "$parts"
  exit 0
fi
[ "$stage" = run ] || { echo "unknown stage $stage (stash, run)"; exit 2; }

if [ ! -d /tmp/site312/sglang ]; then
  ls .sglang-bundle/sgl.* >/dev/null 2>&1 && cp .sglang-bundle/sgl.* "$parts"/
  missing=""
  for n in 0 1 2; do [ -f "$parts/sgl.$n" ] || missing="$missing sgl.$n"; done
  [ -z "$missing" ] || { echo "bundle parts missing:$missing (send them with 'stash' first)"; exit 2; }
  start=$(date +%s)
  cat "$parts"/sgl.0 "$parts"/sgl.1 "$parts"/sgl.2 | xz -d -T0 | tar x -C /tmp || exit 1
  echo "SGLang site assembled in $(( $(date +%s) - start )) s"
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site .sglang-min/*.whl 2>/dev/null \
  || [ -d /tmp/site/aetcd ] || { echo "carry .sglang-min (its wheels) in the first run"; exit 2; }
[ -f .sglang-min/setup-kvcached.sh ] && cp -r .sglang-min /tmp/sglang-min
# shellcheck disable=SC1091
source /tmp/sglang-min/setup-kvcached.sh /tmp/sglang-min || exit 1
export PYTHONPATH="/tmp/site:/tmp/kvsite:/tmp/site312:$PWD"
site_packages=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp /tmp/kvsite/kvcached_autopatch.pth "$site_packages"/ || { echo "kvcached_autopatch.pth not installed"; exit 1; }
python3 -c "import sglang, kvcached, torch; print('sglang', sglang.__version__, 'kvcached', kvcached.__version__, \
'torch', torch.__version__, torch.cuda.get_device_name())" || exit 1

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(doctor tests activation)
status=0
for step in "${steps[@]}"; do
  case "$step" in
    tests)
      model=$(python3 -c "import sys; sys.path.insert(0, 'bench'); import common; \
print(common.dummy_model_folder('llama-3.2-1b', '/tmp/sglang-models'))")
      PRISM_SGLANG_TEST_MODEL="$model" PRISM_SGLANG_TEST_LOAD_FORMAT=dummy \
        PRISM_SGLANG_TEST_ARGS="--attention-backend triton" \
        python3 -m pytest -q -s -p no:cacheprovider tests/test_sglang_driver.py --junitxml "$out/sglang-tests.xml" \
        2>&1 | tee "$out/sglang-tests.log" | tail -25 || status=1
      ;;
    doctor)
      python3 -m prism.cli doctor --device cuda 2>&1 | tee "$out/doctor.log" || status=1
      ;;
    activation)
      python3 bench/activation.py --engines sglang,builtin --repeats 5 --json "$out/activation-sglang.json" \
        2>&1 | tee "$out/activation-sglang.log" | grep -v "^\[" | tail -30 || status=1
      ;;
    *) echo "unknown step $step (doctor, tests, activation)"; status=2 ;;
  esac
done
exit $status
