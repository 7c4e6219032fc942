# Inference image: 06_serve.py's HTTP API (REST, OpenAI-compatible routes, web chat) on a CUDA GPU.
#   docker build -t mini-llm-serve .
#   docker run --gpus all -p 8000:8000 -e SERVE_API_KEY=<key> -v "$PWD/checkpoints/dpo/small/merged:/model:ro" mini-llm-serve
# The checkpoint is mounted, not baked in: any self-contained one (a pretrain final/, a merged/, a full fine-tune).
# A LoRA adapter names its base by a relative path, so mount a folder holding both and pass --model_path after
# the image name (the last --model_path wins).
#
# torch: requirements.txt pins torch==2.13.0 with no index of its own, and on Linux x86_64 PyPI's build of that
# version is the CUDA one, bringing its own CUDA libraries as nvidia-* wheels (as `make install` gets it on a GPU
# machine). The CUDA base image adds what `docker run --gpus` needs to mount the host's driver. Ubuntu 24.04 for
# its Python 3.12: numpy 2.4 needs 3.11 or newer, which 22.04 does not have.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3=3.12.* python3-venv=3.12.* \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The requirements alone first, so that a code change does not reinstall them.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt

WORKDIR /app
COPY . /app
# The code stays root's and read-only to the server; it runs as an unprivileged user with a home for caches.
RUN useradd --create-home --uid 10001 serve
USER 10001
ENV PYTHONPATH=/app

EXPOSE 8000
# /health needs no key, and curl is not in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
# The key comes from SERVE_API_KEY (never a flag: it would show in `ps`); without one the server refuses 0.0.0.0.
ENTRYPOINT ["python", "scripts/06_serve.py", "--mode", "api", "--host", "0.0.0.0", "--port", "8000", "--model_path", "/model"]
CMD []
