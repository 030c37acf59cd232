# llmserve: an OpenAI-compatible server for LLaMA-family models.
#
#   CPU (default):  docker build -t llmserve .
#   CUDA:           docker build -t llmserve:cuda --build-arg VARIANT=cuda .
#   TensorRT-LLM:   docker build -t llmserve:trtllm --build-arg VARIANT=trtllm .
#   run:            docker run -p 8000:8000 -v llmserve-models:/app/checkpoints llmserve
#
# See docs/serving.md for what has and has not been built.

ARG VARIANT=cpu
ARG TRTLLM_TAG=1.0.0

# ---- bases: one per variant; the final stage picks one with VARIANT ---------------------------
FROM python:3.11-slim-bookworm AS base-cpu
# gcc builds the C CPU kernels on first use (llmserve/ops/cpu_kernels.py); without it the
# slower torch reference runs
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
    LLMSERVE_DEVICE=cpu

FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS base-cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && ln -sf /usr/bin/python3 /usr/local/bin/python
ENV TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
    LLMSERVE_DEVICE=cuda

# NVIDIA's TensorRT-LLM release image already holds torch and tensorrt_llm.
FROM nvcr.io/nvidia/tensorrt-llm/release:${TRTLLM_TAG} AS base-trtllm
ENV TORCH_INDEX_URL="" \
    LLMSERVE_DEVICE=cuda

# ---- the image ------------------------------------------------------------------------------------
# hadolint ignore=DL3006
FROM base-${VARIANT}
ARG TORCH_VERSION=2.13.0
# 1: pull the default model into the image at build time (else on first start, into the volume)
ARG PULL_MODEL=0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN useradd --create-home --uid 10001 --user-group llmserve \
    && python -m venv --system-site-packages /opt/venv

WORKDIR /app
# torch first, from the variant's index, so that the project's dependencies do not pull another build
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi

COPY pyproject.toml README.md ./
COPY llmserve ./llmserve
RUN pip install . \
    && mkdir -p /app/checkpoints \
    && chown -R 10001:10001 /app

USER 10001
RUN if [ "$PULL_MODEL" = "1" ]; then llmserve pull; fi

VOLUME ["/app/checkpoints"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# The key, if any, comes from the environment (LLMSERVE_API_KEY), never from the image.
ENTRYPOINT ["sh", "-c", "exec llmserve serve --device \"$LLMSERVE_DEVICE\" --host 0.0.0.0 --port 8000 \"$@\"", "llmserve"]
CMD ["--model", "default"]
