# syntax=docker/dockerfile:1
# The cmh search API (uvicorn via `python -m cli serve`), with artifacts on a volume.
#
# GPU image (default): the CUDA 13.0 base image (the CUDA we develop with; the host needs an
# NVIDIA driver for CUDA 13.0 and the NVIDIA container toolkit) plus PyPI's torch wheels, which
# bring their own CUDA libraries: the "runtime" flavour of the base would hold a second copy.
#   docker build -t cmh:gpu .
# CPU-only image: a plain Ubuntu base and the CPU torch wheels from the PyTorch index.
#   docker build --build-arg BASE_IMAGE=ubuntu:24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t cmh:cpu .
# Test image (adds the tests and the dev extras): docker build --target test -t cmh:test .
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

FROM ${BASE_IMAGE} AS runtime
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    CMH_ARTIFACTS_DIR=/app/artifacts \
    NUMBA_CACHE_DIR=/tmp/numba-cache
# Python 3.11, the version CI tests constraints.txt on (Ubuntu 24.04 ships 3.12): uv installs
# a standalone build.
RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    uv python install 3.11.14 \
    && uv venv --seed --python 3.11.14 /opt/venv
WORKDIR /app
# torch first and from TORCH_INDEX_URL (CUDA or CPU wheels), at constraints.txt's versions.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml README.md constraints.txt ./
COPY cli ./cli
COPY common ./common
COPY indexes ./indexes
COPY evaluation ./evaluation
COPY models ./models
COPY service ./service
COPY store ./store
COPY bench ./bench
# Every other dependency at the version CI tested (constraints.txt); the torch installed above
# satisfies its pins (a +cpu build included).
RUN pip install --no-cache-dir -c constraints.txt . \
    && useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /app/artifacts \
    && chown app:app /app/artifacts
USER 10001:10001
VOLUME ["/app/artifacts"]
EXPOSE 8000
# /healthz: the process answers. Loading the model can take a while, hence the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["python", "-m", "cli", "serve", "--host", "0.0.0.0", "--port", "8000"]

# The test suite inside the image; compose's milvus profile runs the Milvus tests with it.
FROM runtime AS test
USER 0
COPY tests ./tests
# The dev extras (milvus-lite among them) at the versions CI tested.
RUN pip install --no-cache-dir -c constraints.txt "./[dev]"
USER 10001:10001
CMD ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_hamming.py", "tests/test_milvus.py", "tests/test_milvus_store.py"]
