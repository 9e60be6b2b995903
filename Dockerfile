# dpserve prediction service: onnxruntime-gpu on CUDA 13 + cuDNN 9 (the CUDA provider is used when a GPU is
# visible, e.g. `docker compose up` with the GPU reservation; the same image runs on CPU without one).
#   docker build -t dpserve .
#   docker run --gpus all -p 8000:8000 -v "$PWD/model_store:/models:ro" dpserve
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 24.04's Python 3.12 in a virtual environment (PEP 668 forbids pip into the system Python).
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /srv/dpserve
# Serving dependencies only: the package WITHOUT the `train` extra (no torch in the image).
COPY pyproject.toml README.md ./
COPY app ./app
COPY training ./training
RUN pip install . && pip check

# The shipped default models; mount a store read-only over /models to serve others.
COPY model_store /models

RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin dpserve
USER dpserve

# numba compiles the physics kernels at the first model load (about 10 s) and caches them; the package
# directory is not writable by this user, so the cache lives in /tmp. libgomp1 (above) gives numba its
# OpenMP threading layer (thread-safe: models called from several threads at once).
ENV DPSERVE_MODEL_STORE=/models \
    DPSERVE_DEVICE=auto \
    MALLOC_ARENA_MAX=2 \
    NUMBA_CACHE_DIR=/tmp/numba-cache
EXPOSE 8000

# Liveness (the readiness endpoint, /ready, is for load balancers: 503 until the models are loaded).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# One uvicorn worker per container: scale out with more replicas (see docker-compose.yml), so that each
# replica holds one copy of the models and one batcher per model.
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
