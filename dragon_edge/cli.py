"""``dragon-edge``: the device's command line (private store, questions, chat).

Without ``--cloud`` every answer is device-only; with it, the device and the cloud decode one
answer together and only the query text and protocol frames leave the device.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from dragon_core.liveness import DEFAULT_PEER_TIMEOUT_S

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DRAGON on the device: private documents stay here; the cloud helps decode.")

DEFAULT_STORE = os.environ.get("DRAGON_STORE", str(Path.home() / ".dragon" / "store"))

StoreOpt = typer.Option(DEFAULT_STORE, "--store", "-s", help="Private store folder (env DRAGON_STORE).")
CloudOpt = typer.Option(None, "--cloud", "-c", help="Cloud URL, e.g. http://127.0.0.1:8000. Omit for device-only.")
TokenOpt = typer.Option(os.environ.get("DRAGON_TOKEN", ""), "--token", help="Link auth token (env DRAGON_TOKEN).")
PeerTimeoutOpt = typer.Option(DEFAULT_PEER_TIMEOUT_S, "--peer-timeout-s", help=(
    "Give the cloud up after this many seconds without a frame from it (pings keep a live link "
    "talking every 0.5 s); the answer goes on device-only, flagged degraded. 0 = wait for TCP."))


def _check_mode(value: str) -> str:
    from dragon_edge.baselines import UnknownMode, wire_mode

    try:
        wire_mode(value)
    except UnknownMode as exc:
        raise typer.BadParameter(str(exc)) from exc
    return value


ModeOpt = typer.Option("dragon", "--mode", callback=_check_mode, help=(
    "dragon | vdrag (token-wise sync) | sw (sequence-wise) | cloud (cloud-only) | text (DRCG/Text: the cloud "
    "sends its passages' text, the device decodes) | device (device-only)."))


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _open_store(path: str, create: bool):
    from dragon_edge.store import DocumentStore

    return DocumentStore(Path(path).expanduser(), create=create)


@app.command()
def ingest(folder: Path = typer.Argument(..., help="Folder of .txt/.md/.pdf files to add (re-ingests changed files)."),
           store: str = StoreOpt,
           prune: bool = typer.Option(False, help="Also delete sources whose files are gone."),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Add a folder of private notes to the store (incremental: unchanged files are skipped)."""
    _setup_logging(verbose)
    st = _open_store(store, create=True)
    report = st.ingest(folder, prune=prune)
    typer.echo(f"{report}")
    typer.echo(f"store {store}: {st.stats()}")


@app.command()
def search(query: str, store: str = StoreOpt, k: int = typer.Option(4, "-k", help="Passages to show.")) -> None:
    """Search the private store; prints passages with their retrieval score R."""
    st = _open_store(store, create=False)
    for p in st.search(query, k):
        typer.echo(f"[{p.score:6.3f}] {p.source}: {p.text[:200]}")


def _client(store: str, cloud: Optional[str], token: str, engine: str, peer_timeout_s: float | None = None):
    from dragon_edge.sdk import AsyncDragonClient

    st = _open_store(store, create=False) if Path(store).expanduser().exists() else None
    return AsyncDragonClient(cloud_url=cloud, store=st, engine=engine, auth_token=token,
                             peer_timeout_s=peer_timeout_s)


async def _ask(client, messages: list[dict], opts: dict, show_stats: bool, as_json: bool) -> str:
    stream = await client.chat.completions.create(messages=messages, stream=True, **opts)
    text, stats = [], None
    async for chunk in stream:
        delta = chunk.choices[0].delta.content or ""
        text.append(delta)
        if not as_json:
            sys.stdout.write(delta)
            sys.stdout.flush()
        stats = (chunk.model_extra or {}).get("dragon", stats)
    answer = "".join(text)
    if as_json:
        typer.echo(json.dumps({"answer": answer, "dragon": stats}, indent=2))
    else:
        typer.echo("")
        if show_stats and stats:
            typer.echo(format_stats(stats), err=True)
    return answer


def format_stats(st: dict) -> str:
    lat = st.get("per_token_latency_ms") or [0.0]
    agg = ", ".join(f"{k} {v}" for k, v in st.get("aggregator_steps", {}).items())
    acc = lambda x: "n/a" if x is None else f"{x:.0%}"  # noqa: E731
    lines = [
        f"-- {st['tokens']} tokens, finish={st['finish_reason']}"
        + (f", mode={st['mode']}" if st.get("mode", "dragon") != "dragon" else "")
        + (" [DEGRADED: cloud lost, finished on the device]" if st["degraded"] else "")
        + (" [device-only]" if st.get("device_only") and not st["degraded"] else ""),
        f"   TTFT {1000 * (st.get('ttft_s') or 0):.0f} ms, per-token latency mean "
        f"{sum(lat) / len(lat):.1f} ms; acceptance device {acc(st.get('acceptance_device'))}, "
        f"cloud {acc(st.get('acceptance_cloud'))}; rollbacks {st['rollbacks']}, handovers {st['handovers']}",
        f"   aggregated on: {agg or 'n/a'}; link {st['bytes_sent']} B up, {st['bytes_received']} B down, "
        f"{st['bytes_per_token']:.0f} B/token",
    ]
    for src in st.get("sources", []):
        lines.append(f"   source [{src['side']}] {src['name']}" + (f" (R={src['score']:.2f})" if "score" in src else ""))
    return "\n".join(lines)


def _opts(max_tokens: int, k: int, cloud_k: int, mode: str, temperature: float, seed: int, aggregator: str) -> dict:
    """The answer options, validated before anything is loaded (the SDK's rules, once): a bad
    value exits 2 with a one-line error, no traceback."""
    opts = dict(max_tokens=max_tokens, k=k, cloud_k=cloud_k, mode=mode, temperature=temperature or None,
                seed=seed, aggregator=aggregator)
    from dragon_core.errors import DragonError
    from dragon_edge.sdk import answer_options

    try:
        answer_options(max_tokens, temperature, None, seed, dict(k=k, cloud_k=cloud_k, mode=mode, aggregator=aggregator))
    except DragonError as exc:
        param = getattr(exc, "param", None)
        typer.echo(f"error: {exc}" + (f" (option {_FLAGS.get(param, param)})" if param else ""), err=True)
        raise typer.Exit(2) from None
    return opts


_FLAGS = {"max_tokens": "--max-tokens/-n", "k": "-k", "cloud_k": "--cloud-k", "temperature": "--temperature/-t",
          "seed": "--seed", "aggregator": "--aggregator", "mode": "--mode"}


@app.command()
def ask(question: str,
        store: str = StoreOpt, cloud: Optional[str] = CloudOpt, token: str = TokenOpt,
        engine: str = typer.Option("llamacpp", help="On-device engine: llamacpp (GGUF) or hf (transformers)."),
        max_tokens: int = typer.Option(96, "--max-tokens", "-n"),
        k: int = typer.Option(2, "-k", help="Private passages."),
        cloud_k: int = typer.Option(2, "--cloud-k", help="Public passages the cloud retrieves."),
        mode: str = ModeOpt,
        aggregator: str = typer.Option("auto", help="Side that aggregates first: auto (where earlier requests on this link say; device when none) | device | cloud."),
        temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 = greedy."),
        seed: int = typer.Option(0),
        stats: bool = typer.Option(True, "--stats/--no-stats", help="Print DRAGON stats after the answer."),
        as_json: bool = typer.Option(False, "--json", help="Print answer and stats as JSON."),
        peer_timeout_s: float = PeerTimeoutOpt,
        verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Answer one question from your private notes (and the cloud's public corpus with --cloud)."""
    _setup_logging(verbose)
    opts = _opts(max_tokens, k, cloud_k, mode, temperature, seed, aggregator)  # exits 2 on a bad option
    if not question.strip():
        typer.echo("error: the question is empty", err=True)
        raise typer.Exit(2)

    async def main():
        client = _client(store, cloud, token, engine, peer_timeout_s)
        try:
            await _ask(client, [{"role": "user", "content": question}], opts, stats, as_json)
        finally:
            await client.close()

    asyncio.run(main())


@app.command()
def chat(store: str = StoreOpt, cloud: Optional[str] = CloudOpt, token: str = TokenOpt,
         engine: str = typer.Option("llamacpp"), max_tokens: int = typer.Option(128, "--max-tokens", "-n"),
         k: int = typer.Option(2, "-k"), cloud_k: int = typer.Option(2, "--cloud-k"), mode: str = ModeOpt,
         peer_timeout_s: float = PeerTimeoutOpt,
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Interactive chat (each turn retrieves with your latest message). Ctrl-D to quit."""
    _setup_logging(verbose)
    opts = _opts(max_tokens, k, cloud_k, mode, 0.0, 0, "device")  # exits 2 on a bad option

    async def main():
        client = _client(store, cloud, token, engine, peer_timeout_s)
        history: list[dict] = []
        try:
            while True:
                try:
                    line = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    break
                if not line.strip():
                    continue
                history.append({"role": "user", "content": line})
                sys.stdout.write("dragon> ")
                answer = await _ask(client, history, opts, True, False)
                history.append({"role": "assistant", "content": answer})
        finally:
            await client.close()

    asyncio.run(main())


@app.command()
def delete(source: str, store: str = StoreOpt) -> None:
    """Remove one source (file path or SDK source name) and its passages from the store."""
    st = _open_store(store, create=False)
    st.delete(source)
    typer.echo(f"deleted {source}; store: {st.stats()}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
