"""A stand-in for SGLang, which cannot run here (no GPU build of it fits our
machines, see ../shared/device/NOTES.md). NOT SGLang: a small stdlib HTTP
server that speaks the parts of SGLang's native API the driver uses, in the
formats of SGLang 0.5.15's source (docs/sglang.md, "Audit against the
sources"), so tests/test_sglang_driver.py can drive the real driver against a
real process:

- it takes `python -m sglang.launch_server`'s arguments (the ones it needs;
  the rest are accepted and ignored) and records argv and the kvcached
  environment, readable at GET /fake_state;
- GET /health; GET /v1/loads (the scheduler's load snapshot); POST /generate streaming `data: {...}` events and
  `data: [DONE]` (incremental with --incremental-streaming-output, else
  cumulative), errors as SGLang sends them; POST /abort_request (rid or
  abort_all); GET /metrics with sglang:* gauges; POST
  /release_memory_occupation and /resume_memory_occupation (a release while
  a request is still in the batch ends the process, as SGLang 0.5.15's
  scheduler assertion does);
- with ENABLE_KVCACHED=true it keeps a kvcached-format segment
  /dev/shm/$KVCACHED_IPC_NAME (limit, used, prealloc as native int64s):
  created with its "capacity" as the limit, used bytes following the tokens
  its requests hold, removed at exit.

Behaviour for tests, from the environment: FAKE_SGLANG_MODE=exit (log a
failure and exit 3 during start-up), unhealthy (serve, but /health is
always 503), no_kvcached (never create the segment), stuck_after_resume
(a resume answers 200 but generation keeps failing as while released);
FAKE_SGLANG_TOKEN_INTERVAL_S (time per generated token, default 0.01);
FAKE_SGLANG_RESUME_S / FAKE_SGLANG_RELEASE_S (time those calls take);
FAKE_SGLANG_STARTING_S (how long /health answers 503 after the port
opens, as SGLang does until its warm-up is done, default 0.3);
FAKE_SGLANG_ABORT_LAG_S (how long an aborted request stays in the running
batch, default 0.1: SGLang runs it one more step);
FAKE_SGLANG_KV_CAPACITY (bytes, default 1 GiB); FAKE_SGLANG_SHM_DIR."""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import signal
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

_FIELDS = struct.Struct("=qqq")
MODE = os.environ.get("FAKE_SGLANG_MODE", "ok")
TOKEN_INTERVAL_S = float(os.environ.get("FAKE_SGLANG_TOKEN_INTERVAL_S", "0.01"))
RESUME_S = float(os.environ.get("FAKE_SGLANG_RESUME_S", "0.05"))
RELEASE_S = float(os.environ.get("FAKE_SGLANG_RELEASE_S", "0.02"))
ABORT_LAG_S = float(os.environ.get("FAKE_SGLANG_ABORT_LAG_S", "0.1"))
STARTING_S = float(os.environ.get("FAKE_SGLANG_STARTING_S", "0.3"))
KV_CAPACITY = int(os.environ.get("FAKE_SGLANG_KV_CAPACITY", str(1 << 30)))
PAGE = 2 * 1024 * 1024


class State:
    def __init__(self, args, argv):
        self.lock = threading.Lock()
        self.args = args
        self.argv = argv
        self.aborted: list[str] = []
        self.abort_events: dict[str, threading.Event] = {}
        self.disconnected: list[str] = []
        self.generated: list[str] = []  # the rid of every /generate, in order
        self.health_calls = 0
        self.running: dict[str, int] = {}  # rid -> tokens held
        self.released = False
        self.started = time.monotonic()
        self.memory_calls: list[dict] = []
        self.limits_seen: list[int] = []
        config = json.loads((Path(args.model_path) / "config.json").read_text())
        self.max_context = int(config.get("max_position_embeddings", 4096))
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        self.token_bytes = 2 * layers * kv_heads * head_dim * 2 // max(1, args.tp_size)
        self.bundle = PAGE * 2 * layers
        self.segment = None
        if os.environ.get("ENABLE_KVCACHED") == "true" and MODE != "no_kvcached":
            self.segment = Path(os.environ.get("FAKE_SGLANG_SHM_DIR", "/dev/shm")) / os.environ["KVCACHED_IPC_NAME"]
            self.segment.write_bytes(_FIELDS.pack(KV_CAPACITY, 0, 0))

    def publish_usage(self) -> None:
        if self.segment is None:
            return
        tokens = sum(self.running.values())
        used = -(-tokens * self.token_bytes // self.bundle) * self.bundle
        with open(self.segment, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            limit, _, _ = _FIELDS.unpack(f.read(_FIELDS.size))
            f.seek(0)
            f.write(_FIELDS.pack(limit, used, self.bundle if used else 0))
            fcntl.flock(f, fcntl.LOCK_UN)
        if not self.limits_seen or self.limits_seen[-1] != limit:
            self.limits_seen.append(limit)

    def read_limit(self) -> int | None:
        if self.segment is None or not self.segment.exists():
            return None
        limit = _FIELDS.unpack(self.segment.read_bytes()[: _FIELDS.size])[0]
        if not self.limits_seen or self.limits_seen[-1] != limit:
            self.limits_seen.append(limit)
        return limit


STATE: State


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # streams end when the connection closes

    def log_message(self, fmt, *args):
        sys.stdout.write("fake-sglang http: " + fmt % args + "\n")

    def _json(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"{}")

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/v1/loads":
            with STATE.lock:
                running, used = len(STATE.running), sum(STATE.running.values())
            self._json(
                200,
                {
                    "timestamp": "1970-01-01T00:00:00+00:00",
                    "version": "0.5.15",
                    "loads": [
                        {
                            "dp_rank": 0,
                            "num_running_reqs": running,
                            "num_waiting_reqs": 0,
                            "num_waiting_uncached_tokens": 0,
                            "num_used_tokens": used,
                            "num_total_tokens": used,
                            "max_total_num_tokens": 100000,
                            "max_running_requests": 256,
                            "token_usage": used / 100000,
                            "gen_throughput": 0.0,
                            "cache_hit_rate": 0.0,
                            "utilization": 0.0,
                        }
                    ],
                },
            )
        elif self.path == "/health":
            with STATE.lock:
                STATE.health_calls += 1
            starting = time.monotonic() - STATE.started < STARTING_S  # SGLang's ServerStatus.Starting
            self.send_response(503 if MODE == "unhealthy" or starting else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/metrics":
            with STATE.lock:
                running, used = len(STATE.running), sum(STATE.running.values())
            # SGLang 0.5.15's scheduler labels (observability/metrics_collector.py).
            labels = (
                f'model_name="{STATE.args.served_model_name}",engine_type="unified",tp_rank="0",pp_rank="0",'
                'moe_ep_rank="0"'
            )
            text = (
                "# HELP sglang:num_running_reqs The number of running requests.\n"
                "# TYPE sglang:num_running_reqs gauge\n"
                f"sglang:num_running_reqs{{{labels}}} {float(running)}\n"
                f"sglang:num_queue_reqs{{{labels}}} 0.0\n"
                f"sglang:num_used_tokens{{{labels}}} {float(used)}\n"
                f"sglang:token_usage{{{labels}}} {used / 100000:.6f}\n"
                f"sglang:kv_available_tokens{{{labels}}} {float(90000 - used)}\n"
                f"sglang:kv_evictable_tokens{{{labels}}} 10000.0\n"
                f"sglang:kv_used_tokens{{{labels}}} {float(used)}\n"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)
        elif self.path == "/fake_state":
            with STATE.lock:
                self._json(
                    200,
                    {
                        "argv": STATE.argv,
                        "aborted": STATE.aborted,
                        "disconnected": STATE.disconnected,
                        "running": dict(STATE.running),
                        "released": STATE.released,
                        "memory_calls": STATE.memory_calls,
                        "limit": STATE.read_limit(),
                        "limits_seen": STATE.limits_seen,
                        "generated": STATE.generated,
                        "health_calls": STATE.health_calls,
                        "env": {
                            k: os.environ.get(k)
                            for k in (
                                "ENABLE_KVCACHED",
                                "KVCACHED_AUTOPATCH",
                                "KVCACHED_IPC_NAME",
                                "CUDA_VISIBLE_DEVICES",
                            )
                        },
                    },
                )
        else:
            self._json(404, {"detail": "Not Found"})

    def do_POST(self):
        body = self._body()
        if self.path == "/abort_request":
            # As SGLang 0.5.15: an unknown id (or an empty one without abort_all) is ignored; the scheduler
            # aborts every running request whose id starts with the one given; 200 with an empty body.
            rid = body.get("rid") or ""
            with STATE.lock:
                if body.get("abort_all") or rid in STATE.abort_events:
                    for target in list(STATE.abort_events):
                        if body.get("abort_all") or target.startswith(rid):
                            STATE.aborted.append(target)
                            STATE.abort_events[target].set()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path in ("/release_memory_occupation", "/resume_memory_occupation"):
            releasing = self.path.startswith("/release")
            with STATE.lock:
                if releasing and STATE.running:
                    # SGLang 0.5.15: the scheduler asserts is_fully_idle(); the exception ends the server.
                    print(
                        "Scheduler hit an exception: AssertionError: release_memory_occupation should be called "
                        "only when server is idle. (stand-in)",
                        flush=True,
                    )
                    os._exit(1)
                if not releasing and not STATE.released:
                    # SGLang 0.5.15: resuming what was not released is a KeyError in the scheduler (offload_tags).
                    print("Scheduler hit an exception: KeyError: 'weights' (stand-in)", flush=True)
                    os._exit(1)
                if STATE.released and releasing:  # (what SGLang does here is not known: the stand-in refuses)
                    self._json(400, {"error": {"message": "memory is already released (stand-in)"}})
                    return
            time.sleep(RELEASE_S if releasing else RESUME_S)
            with STATE.lock:
                STATE.released = releasing or MODE == "stuck_after_resume"
                STATE.memory_calls.append({"path": self.path, "tags": body.get("tags")})
            self._json(200, None)  # SGLang 0.5.15's handlers return nothing: FastAPI answers null
        elif self.path == "/generate":
            self._generate(body)
        else:
            self._json(404, {"detail": "Not Found"})

    def _generate(self, body: dict) -> None:
        sampling = body.get("sampling_params", {})
        if not isinstance(sampling, dict) or not isinstance(body.get("input_ids", []), list):
            # FastAPI's validation of GenerateReqInput fails before the stream: SGLang answers 400, ErrorResponse.
            self._json(
                400,
                {
                    "object": "error",
                    "message": "1 validation error for GenerateReqInput (stand-in)",
                    "type": "Bad Request",
                    "param": None,
                    "code": 400,
                },
            )
            return
        rid = body.get("rid") or f"fake-{time.monotonic_ns()}"
        with STATE.lock:
            STATE.generated.append(rid)
        ids = body.get("input_ids") or []
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        incremental = STATE.args.incremental_streaming_output
        # SGLang validates inside the stream (a ValueError in its tokenizer manager): an error event, then [DONE].
        refusal = None
        if len(ids) >= STATE.max_context:
            refusal = (
                f"The input ({len(ids)} tokens) is longer than the model's context length ({STATE.max_context} tokens)."
            )
        elif float(sampling.get("temperature", 1.0)) < 0:
            refusal = f"temperature must be a non-negative finite number, got {float(sampling['temperature'])}."
        if refusal is not None:
            self._event(
                {"error": {"message": refusal, "type": "invalid_request_error", "code": 400, "retryable": False}}
            )
            self.wfile.write(b"data: [DONE]\n\n")
            return
        if STATE.released:
            self._event({"error": {"message": "memory released (fake: the real server would fail here)"}})
            self.wfile.write(b"data: [DONE]\n\n")
            return
        stop_event = threading.Event()
        with STATE.lock:
            STATE.abort_events[rid] = stop_event
            STATE.running[rid] = len(ids)
        max_new = int(sampling.get("max_new_tokens", 16))
        out_ids: list[int] = []
        text = ""
        try:
            for i in range(max_new):
                if stop_event.wait(TOKEN_INTERVAL_S):
                    time.sleep(ABORT_LAG_S)  # the aborted request runs one more step before it leaves the batch
                    # An aborted running request finishes with FINISH_ABORT()'s JSON (schedule_batch.py).
                    meta = {
                        "id": rid,
                        "finish_reason": {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None},
                        "prompt_tokens": len(ids),
                        "weight_version": "default",
                        "num_retractions": 0,
                        "reasoning_tokens": 0,
                        "completion_tokens": len(out_ids),
                        "cached_tokens": 0,
                    }
                    self._event(
                        {
                            "text": "" if incremental else text,
                            "output_ids": [] if incremental else out_ids,
                            "meta_info": meta,
                        }
                    )
                    break
                token = 3 + (sum(ids) + i) % 97
                piece = f" t{token}"
                out_ids.append(token)
                text += piece
                with STATE.lock:
                    STATE.running[rid] = len(ids) + len(out_ids)
                    STATE.publish_usage()
                done = i == max_new - 1
                meta = {
                    "id": rid,
                    "finish_reason": {"type": "length", "length": max_new} if done else None,
                    "prompt_tokens": len(ids),
                    "weight_version": "default",
                    "num_retractions": 0,
                    "reasoning_tokens": 0,
                    "completion_tokens": len(out_ids),
                    "cached_tokens": 0,
                }
                self._event(
                    {
                        "text": piece if incremental else text,
                        "output_ids": [token] if incremental else list(out_ids),
                        "meta_info": meta,
                    }
                )
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            with STATE.lock:
                STATE.disconnected.append(rid)
        finally:
            with STATE.lock:
                STATE.running.pop(rid, None)
                STATE.abort_events.pop(rid, None)
                STATE.publish_usage()

    def _event(self, obj) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def main() -> None:
    global STATE
    parser = argparse.ArgumentParser(description="a stand-in for SGLang's launch_server (not SGLang)")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--served-model-name", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tp-size", type=int, default=1)
    parser.add_argument("--incremental-streaming-output", action="store_true")
    args, _ = parser.parse_known_args()
    print(f"fake SGLang stand-in (not SGLang) for {args.model_path} on port {args.port}", flush=True)
    if MODE == "exit":
        print("loading weights ...", flush=True)
        print("RuntimeError: CUDA out of memory (simulated by the stand-in)", flush=True)
        sys.exit(3)
    STATE = State(args, sys.argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True

    def shutdown(signum, frame):
        if STATE.segment is not None:
            STATE.segment.unlink(missing_ok=True)  # as kvcached does at a clean exit
        print(f"fake SGLang stand-in: signal {signum}, exiting", flush=True)
        os._exit(0)

    signal.signal(signal.SIGTERM, shutdown)
    print("The server is fired up and ready to roll! (stand-in)", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
