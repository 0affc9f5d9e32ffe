# cmserve on a CUDA GPU node. Build: docker build -t cmserve .   Run: docker run --gpus all -p 8000:8000 cmserve
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

# Dependencies first (their own layer, rebuilt only when pyproject.toml changes): torch with
# CUDA 12.4 from the PyTorch index, Triton for the fused kernels, then the server's dependencies.
WORKDIR /app
COPY pyproject.toml /app/
RUN pip install torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124 \
    && python -c "import tomllib, subprocess, sys; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; subprocess.check_call([sys.executable, '-m', 'pip', 'install', *deps, 'triton>=3.0'])"

# The source and the default weights (models/weights/) last.
COPY README.md /app/
COPY server /app/server
COPY kernels /app/kernels
COPY models /app/models
RUN pip install --no-deps /app \
    && useradd --system --uid 10001 --no-create-home cmserve

USER 10001
EXPOSE 8000
ENV CMSERVE_HOST=0.0.0.0 CMSERVE_PORT=8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
CMD ["cmserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
