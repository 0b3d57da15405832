"""The Docker image's entrypoint: ``dragon-cloud serve``, but never exposed without credentials.

A container serves on ``0.0.0.0`` (loopback inside a container is unreachable from outside), so
the image's entrypoint is ``python3 -m dragon_vllm.exposure [serve options]``. It refuses to
start the server on a non-loopback address unless BOTH an API key (``--api-key`` / env
``DRAGON_API_KEY``, or ``--api-key-file`` with a key in it) for the OpenAI routes AND a link
token (``--auth-token`` / env ``DRAGON_TOKEN``) for the device link are configured, or
``--insecure`` is given explicitly (then it warns and serves). On loopback nothing is required.
The refusal is one line on stderr and exit code 2; otherwise the process becomes
``python -m dragon_vllm.cli serve ...`` (exec: same PID, so ``docker stop`` reaches the server).

``python3 -m dragon_vllm.exposure healthcheck`` is the image's HEALTHCHECK: GET ``/health`` on the
address the entrypoint recorded (loopback when serving on every interface), with the API key
from ``DRAGON_API_KEY`` if set; exit 0 while the server answers (200, 503 saturated, 401), 1
when it does not (not listening yet, hung, 5xx).

Kept out of ``dragon_vllm.cli`` on purpose: it imports nothing heavy, and a plain
``dragon-cloud serve --host 0.0.0.0`` outside the image is the operator's own choice.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from dragon_http.loopback import is_loopback

#: where the entrypoint records the address it started, for ``healthcheck``
STATE_DIR = Path(os.environ.get("DRAGON_STATE_DIR", "/tmp/dragon-cloud"))
CONTAINER_HOST = "0.0.0.0"
INSECURE_FLAG = "--insecure"
TOKEN_ENV, API_KEY_ENV = "DRAGON_TOKEN", "DRAGON_API_KEY"


@dataclass(frozen=True)
class Exposure:
    host: str
    api_key: bool  # an API key (or keys file) is configured for the OpenAI routes
    link_token: bool  # a token is configured for the device link
    insecure: bool  # --insecure was given


def _value(args: Sequence[str], i: int, name: str) -> tuple[str | None, int]:
    """The value of option ``name`` at ``args[i]`` (``--name V`` or ``--name=V``) and the next index;
    (None, i + 1) if ``args[i]`` is not that option."""
    arg = args[i]
    if arg == name:
        return (args[i + 1] if i + 1 < len(args) else ""), i + 2
    if arg.startswith(name + "="):
        return arg[len(name) + 1:], i + 1
    return None, i + 1


def _file_has_key(path: str) -> bool:
    """As ``dragon_http.auth.load_api_keys`` reads a keys file: a non-empty line not starting with #."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError):
        return False  # `serve` reports the file itself; here it is simply no key
    return any(ln.strip() and not ln.lstrip().startswith("#") for ln in lines)


def parse(argv: Sequence[str], env: Mapping[str, str]) -> tuple[Exposure, list[str]]:
    """Read what matters for exposure from ``dragon-cloud serve`` arguments and the environment,
    with ``serve``'s own rules: ``--host`` and ``--auth-token`` (default ``$DRAGON_TOKEN``): the
    last occurrence wins; API keys are the union of every ``--api-key``, ``--api-key-file``'s
    lines and ``$DRAGON_API_KEY``. Returns it and the arguments to pass on (``--insecure``
    removed, ``--host`` defaulted to the container's ``0.0.0.0``)."""
    host: str | None = None
    token = env.get(TOKEN_ENV, "")
    keys = [env.get(API_KEY_ENV, "")]
    key_file: str | None = None
    insecure = False
    passed: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            passed.extend(argv[i:])
            break
        if arg == INSECURE_FLAG:
            insecure, i = True, i + 1
            continue
        for name in ("--host", "--auth-token", "--api-key", "--api-key-file"):
            value, nxt = _value(argv, i, name)
            if value is not None:
                if name == "--host":
                    host = value
                elif name == "--auth-token":
                    token = value
                elif name == "--api-key":
                    keys.append(value)
                else:
                    key_file = value
                passed.extend(argv[i:nxt])
                i = nxt
                break
        else:
            passed.append(arg)
            i += 1
    if host is None:
        host = CONTAINER_HOST
        passed = ["--host", host, *passed]
    api_key = any(k.strip() for k in keys) or (key_file is not None and _file_has_key(key_file))
    return Exposure(host=host, api_key=api_key, link_token=bool(token.strip()), insecure=insecure), passed


def refusal(e: Exposure) -> str | None:
    """The one-line reason not to start, or None when starting is allowed."""
    if e.insecure or is_loopback(e.host):
        return None
    missing = [what for what, ok in (("an API key (--api-key or DRAGON_API_KEY)", e.api_key),
                                     ("a link token (--auth-token or DRAGON_TOKEN)", e.link_token))
               if not ok]
    if not missing:
        return None
    return (f"dragon-cloud: refusing to serve on {e.host or '*'} (not loopback) without "
            f"{' and '.join(missing)}; set them, or pass --insecure to serve unauthenticated anyway")


def _record(host: str, args: Sequence[str]) -> list[str]:
    """Write the address for ``healthcheck``; add a --port-file unless the caller gave one."""
    try:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        (STATE_DIR / "host").write_text(host + "\n")
        (STATE_DIR / "port").unlink(missing_ok=True)
    except OSError:
        return list(args)
    if any(a == "--port-file" or a.startswith("--port-file=") for a in args):
        return list(args)
    return [*args, "--port-file", str(STATE_DIR / "port")]


def serve(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    if any(a in ("--help", "-h") for a in argv):
        os.execv(sys.executable, [sys.executable, "-m", "dragon_vllm.cli", "serve", *argv])
    exposure, args = parse(argv, env)
    reason = refusal(exposure)
    if reason is not None:
        print(reason, file=sys.stderr, flush=True)
        return 2
    if exposure.insecure and not is_loopback(exposure.host):
        print(f"dragon-cloud: WARNING: --insecure: serving on {exposure.host} with "
              f"API key {'set' if exposure.api_key else 'OFF'}, link token "
              f"{'set' if exposure.link_token else 'OFF'}", file=sys.stderr, flush=True)
    args = _record(exposure.host, args)
    os.execv(sys.executable, [sys.executable, "-m", "dragon_vllm.cli", "serve", *args])
    return 0  # not reached


def health_url() -> str:
    if os.environ.get("DRAGON_HEALTH_URL"):
        return os.environ["DRAGON_HEALTH_URL"]
    try:
        host = (STATE_DIR / "host").read_text().strip()
    except OSError:
        host = "127.0.0.1"
    try:
        port = int((STATE_DIR / "port").read_text().strip())
    except (OSError, ValueError):
        port = 8000
    if host in ("", "0.0.0.0", "::", "localhost"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/health"


#: HTTP answers that mean "the server is up": 200 (ok / degraded), 503 (saturated: alive and
#: busy; a restart would only make it worse), 401 (the probes are protected, --protect-probes,
#: and the check was given no DRAGON_API_KEY: the server answered, its status is unread)
ALIVE = {200: "", 503: " (saturated: alive, busy)", 401: " (probes protected: set DRAGON_API_KEY to read them)"}


def healthcheck(timeout_s: float = 5.0) -> int:
    """Liveness for Docker's HEALTHCHECK: exit 0 iff the server answers ``/health`` with a status
    in :data:`ALIVE` within ``timeout_s`` (while the model loads the port is bound but nothing
    answers, so the check fails until the server is ready)."""
    url = health_url()
    req = urllib.request.Request(url)
    if os.environ.get(API_KEY_ENV, "").strip():
        req.add_header("Authorization", f"Bearer {os.environ[API_KEY_ENV].strip()}")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            status, body = resp.status, resp.read(4096).decode(errors="replace")
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(4096).decode(errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr, flush=True)
        return 1
    if status in ALIVE:
        print(f"healthy: {url}: {status}{ALIVE[status]} {body.strip()}", flush=True)
        return 0
    print(f"unhealthy: {url}: {status} {body.strip()}", file=sys.stderr, flush=True)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["healthcheck"]:
        return healthcheck()
    if argv[:1] == ["serve"]:  # `... exposure serve --host X` reads as well as `... exposure --host X`
        argv = argv[1:]
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
