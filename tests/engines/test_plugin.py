"""The vLLM general plugin (dragon_vllm/plugin.py): entry point, version gate, override, once."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import subprocess
import sys

import pytest

from dragon_vllm import plugin
from dragon_vllm.plugin import UnsupportedVllmVersion, check_vllm_version

# What vLLM's API server, engine core and workers each do at start-up.
LOAD_PLUGINS = (
    "from vllm.plugins import load_general_plugins; load_general_plugins(); "
    "import dragon_vllm.plugin as p; print(p._registered)"
)


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process where register() has not run yet, with no override or fake version set."""
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv(plugin.ALLOW_ENV, raising=False)
    monkeypatch.delenv(plugin.FAKE_VERSION_ENV, raising=False)


def test_entry_point_is_listed_and_loads_register() -> None:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    (ep,) = [ep for ep in eps if ep.name == "dragon"]
    assert ep.value == "dragon_vllm.plugin:register"
    assert ep.load() is plugin.register


@pytest.mark.parametrize(("version", "key"), [
    ("0.26.0", (0, 26)), ("0.26.2+cu130", (0, 26)), ("0.32.0", (0, 32)),
])
def test_verified_versions_pass(version: str, key: tuple[int, int]) -> None:
    assert check_vllm_version(version) == key


@pytest.mark.parametrize("version", ["0.27.0", "0.25.9", "1.0.0", "garbage", "0.2.60"])
def test_other_versions_are_refused(version: str) -> None:
    with pytest.raises(UnsupportedVllmVersion) as e:
        check_vllm_version(version)
    msg = str(e.value)
    assert repr(version) in msg
    assert "0.26.x" in msg and "0.32.x" in msg
    assert plugin.ALLOW_ENV in msg


def test_default_lookup_honours_the_fake_version_hook(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(plugin.FAKE_VERSION_ENV, "0.27.1")
    with pytest.raises(UnsupportedVllmVersion, match=r"'0\.27\.1'"):
        check_vllm_version()


def test_register_refuses_and_logs_an_unverified_version(
    fresh: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(plugin.FAKE_VERSION_ENV, "0.27.0")
    with caplog.at_level(logging.WARNING, logger="dragon.plugin"), \
            pytest.raises(UnsupportedVllmVersion):
        plugin.register()
    # Logged too: vLLM will not call the plugin again in this process if a caller catches this.
    (rec,) = [r for r in caplog.records if r.name == "dragon.plugin"]
    assert rec.levelno == logging.ERROR and "'0.27.0'" in rec.getMessage()
    assert plugin._registered is False  # a second direct call refuses again
    with pytest.raises(UnsupportedVllmVersion):
        plugin.register()


def test_override_turns_the_refusal_into_one_warning(
    fresh: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(plugin.FAKE_VERSION_ENV, "0.27.0")
    monkeypatch.setenv(plugin.ALLOW_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="dragon.plugin"):
        plugin.register()
        plugin.register()
    warnings = [r for r in caplog.records if r.name == "dragon.plugin"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "'0.27.0'" in warnings[0].getMessage()
    assert plugin._registered is True


def test_register_checks_once_per_process(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str | None] = []
    monkeypatch.setattr(plugin, "check_vllm_version", lambda v=None: calls.append(v) or (0, 32))
    plugin.register()
    plugin.register()
    assert len(calls) == 1


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter: no plugin allow-list, override or fake version
    inherited, plus `env`."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("VLLM_PLUGINS", plugin.ALLOW_ENV, plugin.FAKE_VERSION_ENV)}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.vllm
def test_vllm_loads_the_plugin_and_it_passes_on_the_installed_vllm() -> None:
    r = _python(LOAD_PLUGINS)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.vllm
def test_vllm_propagates_the_refusal() -> None:
    # vLLM 0.32 calls each general plugin's function without a try: the refusal escapes
    # load_general_plugins and the process dies with it (a traceback on stderr).
    r = _python(LOAD_PLUGINS, **{plugin.FAKE_VERSION_ENV: "0.27.0"})
    assert r.returncode != 0
    assert "UnsupportedVllmVersion: DRAGON refuses vLLM '0.27.0'" in r.stderr
    assert "load_general_plugins" in r.stderr  # raised from inside vLLM's loader
    assert "True" not in r.stdout


@pytest.mark.vllm
def test_vllm_does_not_call_a_refusing_plugin_twice() -> None:
    # Observed on vLLM 0.32: load_general_plugins sets its flag before calling the plugins, so
    # once a refusal is caught, every later load in that process (EngineArgs, engine core...)
    # returns without calling register(). This is why register() also logs the refusal at ERROR.
    script = (
        "from vllm.plugins import load_general_plugins\n"
        "try:\n    load_general_plugins()\n"
        "except Exception as e:\n    print('refused', type(e).__name__)\n"
        "load_general_plugins()\nprint('second load passed')\n"
    )
    r = _python(script, **{plugin.FAKE_VERSION_ENV: "0.27.0"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["refused", "UnsupportedVllmVersion", "second", "load", "passed"]
    # The ERROR line (logging's last-resort handler), printed once: register() ran once.
    assert r.stderr.count("DRAGON refuses vLLM '0.27.0'") == 1
