# cmserve. GPU node (default): docker build -t cmserve .   Run: docker run --gpus all -p 8000:8000 cmserve
# CPU-only image (what docker-compose.cpu.yml builds):
#   docker build -t cmserve:cpu --build-arg BASE=ubuntu:24.04 --build-arg TORCH=2.13.0 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
# torch is pinned to what the project runs: 2.11 with CUDA on the GPU hosts `make gpu-check` ran
# on (Python 3.12, Triton 3.6), 2.13 on the CPU where CI runs. Ubuntu 24.04's Python is 3.12.
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG TORCH=2.11.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

# Triton compiles a small C launcher the first time a kernel runs (a C compiler and Python's
# headers) and caches kernels under TRITON_CACHE_DIR: a volume the non-root user can write, also
# where the root filesystem is read-only (the Kubernetes pod mounts an emptyDir there).
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    HOME=/home/cmserve \
    TRITON_CACHE_DIR=/var/cache/cmserve/triton

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --system --uid 10001 --create-home --home-dir /home/cmserve cmserve \
    && mkdir -p /var/cache/cmserve/triton \
    && chown -R 10001 /var/cache/cmserve

# Dependencies first (their own layer, rebuilt only when pyproject.toml changes): the pinned torch,
# Triton for the fused kernels, then the server's dependencies.
WORKDIR /app
COPY pyproject.toml /app/
RUN pip install "torch==${TORCH}" --index-url "${TORCH_INDEX}" \
    && python -c "import tomllib, subprocess, sys; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps, 'triton>=3.0'])"

# The source and the default weights (models/weights/) last.
COPY README.md /app/
COPY server /app/server
COPY kernels /app/kernels
COPY models /app/models
RUN pip install --no-deps /app

USER 10001
VOLUME ["/var/cache/cmserve"]
EXPOSE 8000
ENV CMSERVE_HOST=0.0.0.0 CMSERVE_PORT=8000
# healthy = ready: loaded, warmed up (kernels compiled, graphs captured), not draining
HEALTHCHECK --interval=10s --timeout=3s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
CMD ["cmserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
