#!/bin/bash
# The one-GPU showdown in one device call (bench/one_gpu.py), with what the logs say beside its table.
# Run on the lent GPU machine from the repository root, with ../shared/device/ copied to .device/ (carried):
#   RATES="8 14" SHOWDOWN_TIMEOUT=540 bash bench/one_gpu_device.sh NAME prism time-share
# Writes under $OUT: NAME.json/.png/.log (the bench), NAME-POLICY-steps.{json,txt} (bench/step_log_summary.py),
# NAME-kv-waits.txt (the agent log's KV waits, allocator refusals, pending shrinks, switch-offs of a serving
# engine) and NAME-logs.tgz. On an H200 it caps the card at an H100's 79.19 GiB (--gpu-memory-gb) and takes the
# H200 profile for the simulator. Several policies but static share one cluster (--share-engines).
# SHOWDOWN_ARGS: more of bench/one_gpu.py's flags (for example "--shed-load").
NAME=$1; shift
source .device/setup-kvcached.sh .device > /tmp/setup.log 2>&1
python3 -m pip install -q --no-index --no-deps --target /tmp/site .device/wheels/*.whl > /tmp/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PYTHONPATH:$PWD:$PWD/clients/python
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $GPU"
EXTRA=""
if echo "$GPU" | grep -q H200; then EXTRA="--gpu-memory-gb 79.19 --profile bench/results/sim-profile-h200.json"; fi
SHARE=""
if [ "$#" -gt 1 ] && ! echo "$@" | grep -q static; then SHARE="--share-engines"; fi
PRISM_ENGINE_STEP_LOG=1 timeout ${SHOWDOWN_TIMEOUT:-550} python3 bench/one_gpu.py --policies "$@" $SHARE --rates ${RATES:-8 14} --duration 30 \
  --reset-settle-s 62 --cuda-mps on --reserve-gb 14 --simulate $EXTRA ${SHOWDOWN_ARGS:-} \
  --out $OUT/$NAME.json --plot $OUT/$NAME.png --state-dir /tmp/st > $OUT/$NAME.log 2>&1
echo "bench rc=$?"
for p in "$@"; do
  if [ -d /tmp/st/$p ]; then
    python3 bench/step_log_summary.py /tmp/st/$p --json $OUT/$NAME-$p-steps.json --contention /tmp/st/models-$p.json > $OUT/$NAME-$p-steps.txt 2>&1
  fi
done
( for d in /tmp/st/*/logs; do echo "== $d"; grep -h "admission waits for KV" $d/agent.log | head -3; echo "waits: $(grep -c 'admission waits for KV' $d/agent.log)"; echo "refused by allocator: $(grep -c 'refused by allocator' $d/agent.log)"; echo "shrink pending: $(grep -c "shrink pending" $d/agent.log)"; echo "switched off though it serves: $(grep -c "though it serves" $d/agent.log)"; done ) > $OUT/$NAME-kv-waits.txt 2>&1
tar czf $OUT/$NAME-logs.tgz -C /tmp/st --exclude='*.safetensors' --exclude='*.bin' . 2>/dev/null
ls -la $OUT
tail -25 $OUT/$NAME.log
