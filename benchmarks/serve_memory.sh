#!/usr/bin/env bash
# Resident memory of the README's `vllm-steer serve` example: starts it as written (plus any extra
# serve arguments given here), and sums VmRSS of the API server, engine core and worker (and vLLM's
# helper processes) once it answers, and again after one steered completion. Stops the server.
# usage: benchmarks/serve_memory.sh [PORT [extra serve args...]]     (from the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-8000}; shift || true
LOG=$(mktemp /tmp/serve_memory.XXXXXX.log)
MODEL=$(.venv/bin/vllm-steer default-model)
setsid .venv/bin/vllm-steer serve "$MODEL" \
    --steer sentiment=steers/sentiment.safetensors \
    --steer detox=steers/detox.safetensors \
    --dtype float32 --port "$PORT" "$@" > "$LOG" 2>&1 &
PID=$!
stop() { kill -TERM -- "-$PID" 2>/dev/null || true; for _ in $(seq 30); do kill -0 "$PID" 2>/dev/null || return 0; sleep 1; done
         kill -KILL -- "-$PID" 2>/dev/null || true; }
trap stop EXIT
rss() {  # every process in the server's session: pid, RSS, command; then the total
    local total=0
    for p in $(ps -o pid= -s "$PID"); do
        r=$(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        printf '  %7s %8d MiB  %s\n' "$p" $((r / 1024)) "$(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-70)"
        total=$((total + r))
    done
    echo "  total $((total / 1024)) MiB"
}
START=$(date +%s)
until curl -sf "localhost:$PORT/v1/models" > /dev/null; do
    kill -0 "$PID" 2>/dev/null || { echo "server exited:"; tail -30 "$LOG"; exit 1; }
    sleep 2
done
echo "ready after $(( $(date +%s) - START )) s ($(date -u +%FT%TZ), $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/2^20}' /proc/meminfo))"
sleep 5
echo "after ready:"; rss
curl -s "localhost:$PORT/v1/completions" -H 'content-type: application/json' \
    -d '{"model": "'"$MODEL"'", "prompt": "The movie I watched last night was", "max_tokens": 20,
         "temperature": 0, "vllm_xargs": {"steer_sentiment": 5}}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])'
sleep 3
echo "after one request:"; rss
grep -E "vllm-steer: CPU build|Explicitly set|Auto set|KV cache size" "$LOG" | cut -c1-260
