# One image for the web app and the workers (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/huggingface \
    WWT_DATA_DIR=/data/wwt

WORKDIR /srv/wwt

# torch first, in its own layer: the largest by far, and it changes least. The default wheel
# runs on CUDA GPUs and on CPU; for a smaller CPU-only image pass a CPU wheel index with
# --build-arg PIP_EXTRA_INDEX_URL=... and --build-arg TORCH_SPEC="torch==X.Y.Z+cpu".
ARG TORCH_SPEC="torch>=2.2"
ARG PIP_EXTRA_INDEX_URL=""
RUN pip install "${TORCH_SPEC}"

COPY pyproject.toml README.md ./
COPY model ./model
COPY app ./app
COPY workers ./workers
RUN pip install .

RUN useradd --create-home --uid 1000 wwt && mkdir -p /data/huggingface /data/wwt && chown -R wwt /data
USER wwt

EXPOSE 7860
CMD ["wwt", "serve", "--host", "0.0.0.0", "--port", "7860"]
