#!/usr/bin/env bash
# NVIDIA's aiperf, a third-party OpenAI-API load generator that users point at vLLM, run
# unmodified against `loraplex serve`'s HTTP API with the requests spread over many adapters.
#
# End to end: aiperf (pinned) in a venv of its own, never the project's; random rank-8 PEFT
# adapters for the embedded model (harness.write_adapters); `loraplex serve` on HTTP port
# $PORT; the adapters registered as vLLM registers them (POST /v1/load_lora_adapter); one aiperf
# run on /v1/chat/completions (or ENDPOINT=completions) with SSE streaming, the model name
# round-robin over every adapter and the base model, the tokenizer the embedded model's
# local checkpoint. The report is printed; aiperf's CSV/JSON/JSONL exports and the server's log
# land in benchmarks/results/loadtool-$ENDPOINT/. About 3 minutes on 2 cores (aiperf's own
# processes take part of them).
#
#   bash benchmarks/loadtool.sh                         # chat, 8 concurrent, 104 requests
#   ENDPOINT=completions REQUESTS=52 bash benchmarks/loadtool.sh
#
# HF_HUB_OFFLINE stays unset, because of aiperf 0.13.0 itself: with it set, aiperf hands a
# local --tokenizer directory to huggingface_hub's snapshot_download as if it were a repo id
# and fails (HFValidationError); unset, a path is loaded from disk with no hub call. aiperf
# scrapes the server's metrics at the API's /metrics, as it does vLLM's.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
AIPERF_VERSION=0.13.0
VENV=${LOADTOOL_VENV:-/tmp/loadtool-venv}
PY=${LORAPLEX_PY:-$ROOT/.venv/bin/python}
PORT=${PORT:-8765}
ENDPOINT=${ENDPOINT:-chat}
ADAPTERS=${ADAPTERS:-12}
RANK=${RANK:-8}
CONCURRENCY=${CONCURRENCY:-8}
REQUESTS=${REQUESTS:-104}
ISL=${ISL:-128}
OSL=${OSL:-64}
OUT=${OUT:-$ROOT/benchmarks/results/loadtool-$ENDPOINT}
HOME_DIR=${LORAPLEX_HOME:-$HOME/.cache/loraplex}
WORK=$(mktemp -d /tmp/loadtool.XXXXXX)  # adapters and store: under the temp dir, an allowed root

if ! "$VENV/bin/aiperf" --version 2>/dev/null | grep -q "$AIPERF_VERSION"; then
  python3.11 -m venv "$VENV"
  "$VENV/bin/pip" install -q "aiperf==$AIPERF_VERSION"
fi

echo "writing $ADAPTERS random rank-$RANK adapters under $WORK/adapters"
(cd benchmarks && "$PY" -c '
import sys, harness
harness.write_adapters(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
' "$HOME_DIR" "$ADAPTERS" "$RANK" "$WORK/adapters") > "$WORK/adapters.log" 2>&1
TOKENIZER=$("$PY" -c '
import sys
from pathlib import Path
from loraplex.core.model import embedded_model_dir
print(embedded_model_dir(Path(sys.argv[1])))
' "$HOME_DIR" 2>/dev/null)

if curl -s -o /dev/null "http://127.0.0.1:$PORT/"; then
  echo "port $PORT already answers: stop that server or set PORT" >&2
  exit 1
fi
"$PY" -m loraplex.server.cli serve --home "$HOME_DIR" --port 0 --http-port "$PORT" \
  --metrics-port 0 --adapter-store "$WORK/store" > "$WORK/server.log" 2>&1 &
SERVER=$!
cleanup() {
  set +e
  kill "$SERVER" 2>/dev/null
  wait "$SERVER" 2>/dev/null
  mkdir -p "$OUT" && cp "$WORK/server.log" "$OUT/"
  rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 180); do
  kill -0 "$SERVER" 2>/dev/null || { tail -20 "$WORK/server.log"; exit 1; }
  curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$PORT/ready" > /dev/null

MODELS=""
for i in $(seq 0 $((ADAPTERS - 1))); do
  curl -sf -X POST "http://127.0.0.1:$PORT/v1/load_lora_adapter" -H 'content-type: application/json' \
    -d "{\"lora_name\": \"bench-$i\", \"lora_path\": \"$WORK/adapters/bench-$i\"}" > /dev/null
  MODELS+="bench-$i,"
done
MODELS+=$(basename "$TOKENIZER")  # the base model's id: the embedded checkpoint's name
echo "registered $ADAPTERS adapters; models: $MODELS"

rm -rf "$OUT"
mkdir -p "$OUT"
"$VENV/bin/aiperf" profile \
  --url "http://127.0.0.1:$PORT" --endpoint-type "$ENDPOINT" --streaming \
  --model-names "$MODELS" --model-selection-strategy round-robin \
  --tokenizer "$TOKENIZER" \
  --synthetic-input-tokens-mean "$ISL" --synthetic-input-tokens-stddev 0 \
  --output-tokens-mean "$OSL" --output-tokens-stddev 0 --extra-inputs ignore_eos:true \
  --concurrency "$CONCURRENCY" --request-count "$REQUESTS" \
  --warmup-request-count "$(( ADAPTERS + 1 ))" \
  --random-seed 0 --workers-max 2 --ui none --no-gpu-telemetry \
  --artifact-dir "$OUT" 2>&1 | tee "$OUT/aiperf.out"
echo "report: $OUT (profile_export_aiperf.csv/.json, profile_export.jsonl, server.log)"
