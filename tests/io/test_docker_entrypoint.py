"""The Docker image's entrypoint (dragon_vllm/exposure.py) and the Dockerfile that uses it.

Cheap (no engine, no model, no image build): the exposure rule itself, and the Dockerfile's
ENTRYPOINT / HEALTHCHECK commands run as written against this checkout. The image itself is
built and health-checked by scripts/build-image.sh (not in CI; benchmarks/results/docker_build_cpu.*).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dragon_vllm import exposure
from dragon_vllm.exposure import Exposure, is_loopback, parse, refusal

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


# ---------------------------------------------------------------- the rule


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"])
def test_loopback_hosts(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.0.0.7", "192.168.1.2", "2001:db8::1",
                                  "no-such-host.invalid"])
def test_exposed_hosts(host):
    assert not is_loopback(host)


def _parse(*argv, **env):
    return parse(list(argv), env)


def test_default_host_is_every_interface_and_refused_without_credentials():
    e, args = _parse()
    assert e == Exposure(host="0.0.0.0", api_key=False, link_token=False, insecure=False)
    assert args[:2] == ["--host", "0.0.0.0"]
    msg = refusal(e)
    assert msg is not None and "\n" not in msg
    assert "0.0.0.0" in msg and "--api-key" in msg and "--auth-token" in msg and "--insecure" in msg


@pytest.mark.parametrize("argv,env,missing", [
    (["--host", "0.0.0.0"], {}, ("API key", "link token")),
    (["--host", "0.0.0.0", "--auth-token", "T"], {}, ("API key",)),
    (["--host=0.0.0.0", "--api-key=K"], {}, ("link token",)),
    (["--host", "10.1.2.3"], {"DRAGON_API_KEY": "K"}, ("link token",)),
    (["--host", "::"], {"DRAGON_TOKEN": "T"}, ("API key",)),
    # empty or blank values are not credentials, and an explicit empty option overrides the env
    (["--api-key", "", "--auth-token", "  "], {}, ("API key", "link token")),
    (["--api-key-file", "/nonexistent/keys", "--auth-token", "T"], {}, ("API key",)),
    (["--auth-token", ""], {"DRAGON_TOKEN": "T", "DRAGON_API_KEY": "K"}, ("link token",)),
])
def test_refused(argv, env, missing):
    msg = refusal(parse(argv, env)[0])
    assert msg is not None and "\n" not in msg
    for what in missing:
        assert what in msg
    for what in {"API key", "link token"} - set(missing):
        assert what not in msg


@pytest.mark.parametrize("argv,env", [
    (["--host", "0.0.0.0", "--api-key", "K", "--auth-token", "T"], {}),
    (["--host", "0.0.0.0"], {"DRAGON_API_KEY": "K", "DRAGON_TOKEN": "T"}),
    (["--api-key", "K1", "--api-key", "", "--auth-token=T"], {}),  # repeatable: any key counts
    (["--api-key", "", "--auth-token", "T"], {"DRAGON_API_KEY": "K"}),  # keys are a union with the env
    (["--host", "0.0.0.0", "--insecure"], {}),                  # explicit opt-out
    (["--insecure"], {}),
    (["--host", "127.0.0.1"], {}),                              # loopback needs nothing
    (["--host", "localhost", "--port", "9000"], {}),
])
def test_accepted(argv, env):
    assert refusal(parse(argv, env)[0]) is None


def test_a_keys_file_counts_if_it_holds_a_key(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment only\n\n")
    assert "API key" in refusal(_parse("--api-key-file", str(keys), "--auth-token", "T")[0])
    keys.write_text("# ops\nK1\n")
    assert refusal(_parse(f"--api-key-file={keys}", "--auth-token", "T")[0]) is None


def test_insecure_is_not_passed_on_and_other_options_are_kept():
    e, args = _parse("--insecure", "--index", "/idx/w", "--host", "0.0.0.0", "-v", "--k", "3")
    assert e.insecure
    assert args == ["--index", "/idx/w", "--host", "0.0.0.0", "-v", "--k", "3"]


def test_last_occurrence_wins():
    e, _ = _parse("--host", "0.0.0.0", "--host", "127.0.0.1")
    assert e.host == "127.0.0.1" and refusal(e) is None


# ---------------------------------------------------------------- main(): exit code, exec


@pytest.fixture
def execs(monkeypatch, tmp_path):
    """Capture os.execv instead of starting a server; state under tmp_path."""
    calls: list[list[str]] = []

    def fake_execv(path, argv):
        calls.append(list(argv))
        raise SystemExit(0)

    monkeypatch.setattr(exposure.os, "execv", fake_execv)
    monkeypatch.setattr(exposure, "STATE_DIR", tmp_path / "state")
    for var in ("DRAGON_TOKEN", "DRAGON_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_main_refuses_with_exit_2_and_one_line(execs, capsys):
    assert exposure.main(["--host", "0.0.0.0", "--auth-token", "T"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dragon-cloud: refusing to serve on 0.0.0.0")
    assert execs == []


def test_main_execs_serve_with_credentials(execs, monkeypatch, tmp_path):
    monkeypatch.setenv("DRAGON_API_KEY", "K")
    with pytest.raises(SystemExit):
        exposure.main(["serve", "--auth-token", "T", "--index", "/idx"])
    (argv,) = execs
    assert argv[1:4] == ["-m", "dragon_vllm.cli", "serve"]
    assert argv[4:] == ["--host", "0.0.0.0", "--auth-token", "T", "--index", "/idx",
                        "--port-file", str(tmp_path / "state" / "port")]
    assert (tmp_path / "state" / "host").read_text().strip() == "0.0.0.0"


def test_main_insecure_warns_and_serves(execs, capsys):
    with pytest.raises(SystemExit):
        exposure.main(["--insecure", "--port-file", "/tmp/p"])
    assert "WARNING: --insecure" in capsys.readouterr().err
    (argv,) = execs
    assert "--insecure" not in argv and argv.count("--port-file") == 1


# ---------------------------------------------------------------- the Dockerfile, run as written


def _dockerfile() -> str:
    return DOCKERFILE.read_text()


def _json_instruction(name: str) -> list[str]:
    text = _dockerfile().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return json.loads(line[len(name):].strip())


def _healthcheck_cmd() -> list[str]:
    text = _dockerfile().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK ")]
    return json.loads(line.split(" CMD ", 1)[1].strip())


def _as_here(cmd: list[str]) -> list[str]:
    assert cmd[0] == "python3", cmd  # the image's interpreter; here: this venv's
    return [sys.executable, *cmd[1:]]


def test_dockerfile_base_is_a_build_argument_with_the_gpu_default():
    text = _dockerfile()
    first_from = text.index("\nFROM ")
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text[:first_from], re.M))
    assert args["BASE"].startswith("vllm/vllm-openai:") and args["ENGINE"] == "gpu"
    froms = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", text, re.M)
    stages = {alias: image for image, alias in froms if alias}
    assert stages == {"engine-gpu": "${BASE}", "engine-cpu": "${BASE}"}
    assert froms[-1] == ("engine-${ENGINE}", "")  # the cloud is built on the chosen engine


def _run_entrypoint(*args, env=None):
    env = {k: v for k, v in os.environ.items() if k not in ("DRAGON_TOKEN", "DRAGON_API_KEY")} | (env or {})
    return subprocess.run(_as_here(_json_instruction("ENTRYPOINT")) + list(args), cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_dockerfile_entrypoint_refuses_an_exposed_server_without_credentials():
    for args, env in [((), {}), (("--auth-token", "T"), {}), (("--host", "0.0.0.0"), {"DRAGON_TOKEN": "T"})]:
        proc = _run_entrypoint(*args, env=env)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("dragon-cloud: refusing") and proc.stderr.count("\n") == 1


def test_dockerfile_entrypoint_passes_help_through_to_serve():
    proc = _run_entrypoint("--help")
    assert proc.returncode == 0 and "--auth-token" in proc.stdout


class _Health(http.server.BaseHTTPRequestHandler):
    auth: list[str | None] = []
    status = 200

    def do_GET(self):  # noqa: N802
        type(self).auth.append(self.headers.get("Authorization"))
        status = type(self).status if self.path == "/health" else 404
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b'{"status": "..."}')

    def log_message(self, *a):
        pass


def test_dockerfile_healthcheck_reads_the_recorded_port_and_sends_the_key(tmp_path):
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    state = tmp_path / "state"
    state.mkdir()
    (state / "host").write_text("0.0.0.0\n")
    (state / "port").write_text(f"{srv.server_port}\n")
    env = dict(os.environ, DRAGON_STATE_DIR=str(state), DRAGON_API_KEY="K")
    env.pop("DRAGON_HEALTH_URL", None)
    cmd = _as_here(_healthcheck_cmd())

    def check() -> int:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60).returncode

    try:
        for status, want in [(200, 0), (503, 0), (401, 0), (500, 1), (404, 1)]:
            _Health.status = status
            assert check() == want, status
        assert _Health.auth[-1] == "Bearer K"
    finally:
        srv.shutdown()
        srv.server_close()
    assert check() == 1  # nothing listening any more: unhealthy


def test_build_script_is_not_part_of_ci():
    script = ROOT / "scripts" / "build-image.sh"
    assert script.exists() and os.access(script, os.X_OK)
    ci = [p for p in [ROOT / "Makefile", *(ROOT / ".github").rglob("*.yml")] if p.exists()]
    for path in ci:
        assert "build-image.sh" not in path.read_text(), path
