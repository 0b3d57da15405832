"""``dragon-edge``: the device's command line (private store, questions, chat).

Without ``--cloud`` every answer is device-only; with it, the device and the cloud decode one
answer together and only the query text and protocol frames leave the device.

Errors print as one line (``error: ...``) and exit non-zero; ``--debug`` (anywhere on the
command line, or env ``DRAGON_DEBUG=1``) shows the full traceback instead.
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

DEBUG_ENV = "DRAGON_DEBUG"

DEFAULT_STORE = os.environ.get("DRAGON_STORE", str(Path.home() / ".dragon" / "store"))

StoreOpt = typer.Option(DEFAULT_STORE, "--store", "-s", help="Private store folder (env DRAGON_STORE).")
CloudOpt = typer.Option(None, "--cloud", "-c", help="Cloud URL, e.g. http://127.0.0.1:8000. Omit for device-only.")
TokenOpt = typer.Option(os.environ.get("DRAGON_TOKEN", ""), "--token", help="Link auth token (env DRAGON_TOKEN).")
PeerTimeoutOpt = typer.Option(DEFAULT_PEER_TIMEOUT_S, "--peer-timeout-s", help=(
    "Give the cloud up after this many seconds without a frame from it (pings keep a live link "
    "talking every 0.5 s); the answer goes on device-only, flagged degraded. 0 = wait for TCP."))


def _check_mode(value: str) -> str:
    from dragon_core.modes import UnknownMode, wire_mode

    try:
        wire_mode(value)
    except UnknownMode as exc:
        raise typer.BadParameter(str(exc)) from exc
    return value


ModeOpt = typer.Option("dragon", "--mode", callback=_check_mode, help=(
    "dragon | vdrag (token-wise sync) | sw (sequence-wise) | cloud (cloud-only) | text (DRCG/Text: the cloud "
    "sends its passages' text, the device decodes) | concat (DRCG: all passages in one prompt of <= 256 tokens) "
    "| concord (CONCORD: the device commits each token, certified from the cloud's evidence; greedy only) "
    "| device (device-only)."))
ConcordDebtOpt = typer.Option(4.0, "--concord-debt-max", help=(
    "--mode concord: wait for the cloud's evidence while the waiting debt is <= this (inf: every step, "
    "exact dense DRAGON greedy; -inf: never, device-only)."))
ConcordTopMOpt = typer.Option(1, "--concord-top-m", help="--mode concord: entries the cloud's evidence lists per step.")
RetrieveEveryOpt = typer.Option(0, "--retrieve-every", help=(
    "Iterative retrieval: both sides retrieve again every N generated tokens, with the question and the "
    "answer so far as the query (0: once, before the answer). Modes dragon, vdrag, sw, cloud."))


@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help=(
        f"Print full tracebacks on errors (env {DEBUG_ENV}=1); may go anywhere on the command line."))) -> None:
    """(main() reads --debug itself; this only documents it in --help.)"""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _open_store(path: str, create: bool):
    from dragon_edge.store import DocumentStore

    return DocumentStore(Path(path).expanduser(), create=create)


def _store_line(st) -> str:
    stats = st.stats()
    staged = (f"; {stats.staged_passages} passages of {stats.staged_documents} large documents staged "
              "(the next ingest resumes them)" if stats.staged_documents else "")
    return f"store {stats.path}: {stats.sources} sources, {stats.passages} passages{staged}"


@app.command()
def ingest(folder: Path = typer.Argument(..., help="Folder of .txt/.md/.pdf files to add (re-ingests changed files)."),
           store: str = StoreOpt,
           prune: bool = typer.Option(False, help="Also delete sources whose files are gone."),
           max_file_mb: float = typer.Option(64.0, "--max-file-mb", min=0.001, help=(
               "Skip (with the reason) files larger than this many MiB.")),
           follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help=(
               "Also read files that symbolic links point to outside the folder (never devices or FIFOs).")),
           verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Add a folder of private notes to the store (incremental: unchanged files are skipped).
    Only regular files are read; FIFOs, devices, sockets, link loops and links out of the folder
    are skipped and listed. Large files commit in chunks: an interrupted ingest resumes."""
    _setup_logging(verbose)
    st = _open_store(store, create=True)
    try:
        report = st.ingest(folder, prune=prune, max_file_bytes=int(max_file_mb * 2**20),
                           follow_symlinks=follow_symlinks)
    except KeyboardInterrupt:
        typer.echo(f"interrupted: what was committed is kept; run the same command to resume\n{_store_line(st)}",
                   err=True)
        raise typer.Exit(130) from None
    typer.echo(report.summary())
    typer.echo(_store_line(st))


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
    if st.get("steps_certified") is not None:  # CONCORD
        lines.append(f"   concord: certified {st['steps_certified']}, dense {st['steps_dense']}, local "
                     f"{st['steps_local']} (supplemented {st['steps_supplemented']}, waited {st['waited_ms']:.0f} ms)")
    for src in st.get("sources", []):
        lines.append(f"   source [{src['side']}] {src['name']}" + (f" (R={src['score']:.2f})" if "score" in src else ""))
    return "\n".join(lines)


def _opts(max_tokens: int, k: int, cloud_k: int, mode: str, temperature: float, seed: int, aggregator: str,
          concord_debt_max: float = 4.0, concord_top_m: int = 1, retrieve_every: int = 0) -> dict:
    """The answer options, validated before anything is loaded (the SDK's rules, once): a bad
    value exits 2 with a one-line error, no traceback."""
    opts = dict(max_tokens=max_tokens, k=k, cloud_k=cloud_k, mode=mode, temperature=temperature or None,
                seed=seed, aggregator=aggregator)
    if mode == "concord" or (concord_debt_max, concord_top_m) != (4.0, 1):
        opts.update(concord_debt_max=concord_debt_max, concord_top_m=concord_top_m)
    if retrieve_every:
        opts.update(retrieve_every=retrieve_every)
    from dragon_core.errors import DragonError
    from dragon_edge.runtime import answer_options

    try:
        answer_options(max_tokens, temperature, None, seed,
                       {key: val for key, val in opts.items() if key not in ("max_tokens", "temperature", "seed")})
    except DragonError as exc:
        param = getattr(exc, "param", None)
        typer.echo(f"error: {exc}" + (f" (option {_FLAGS.get(param, param)})" if param else ""), err=True)
        raise typer.Exit(2) from None
    return opts


_FLAGS = {"max_tokens": "--max-tokens/-n", "k": "-k", "cloud_k": "--cloud-k", "temperature": "--temperature/-t",
          "seed": "--seed", "aggregator": "--aggregator", "mode": "--mode",
          "concord_debt_max": "--concord-debt-max", "concord_top_m": "--concord-top-m",
          "retrieve_every": "--retrieve-every"}


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
        concord_debt_max: float = ConcordDebtOpt,
        concord_top_m: int = ConcordTopMOpt,
        retrieve_every: int = RetrieveEveryOpt,
        stats: bool = typer.Option(True, "--stats/--no-stats", help="Print DRAGON stats after the answer."),
        as_json: bool = typer.Option(False, "--json", help="Print answer and stats as JSON."),
        peer_timeout_s: float = PeerTimeoutOpt,
        verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Answer one question from your private notes (and the cloud's public corpus with --cloud)."""
    _setup_logging(verbose)
    opts = _opts(max_tokens, k, cloud_k, mode, temperature, seed, aggregator, concord_debt_max,
                 concord_top_m, retrieve_every)  # exits 2 on a bad option
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
         concord_debt_max: float = ConcordDebtOpt, concord_top_m: int = ConcordTopMOpt,
         retrieve_every: int = RetrieveEveryOpt, peer_timeout_s: float = PeerTimeoutOpt,
         verbose: bool = typer.Option(False, "--verbose", "-v")) -> None:
    """Interactive chat (each turn retrieves with your latest message). Ctrl-D to quit."""
    _setup_logging(verbose)
    opts = _opts(max_tokens, k, cloud_k, mode, 0.0, 0, "device", concord_debt_max, concord_top_m,
                 retrieve_every)  # exits 2 on a bad option

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


EDGE_API_KEY_ENV = "DRAGON_EDGE_API_KEY"


@app.command()
def serve(store: str = StoreOpt, cloud: Optional[str] = CloudOpt, token: str = TokenOpt,
          engine: str = typer.Option("llamacpp", help="On-device engine: llamacpp (GGUF) or hf (transformers)."),
          host: str = typer.Option("127.0.0.1", help=(
              "Address to listen on. Loopback by default: only apps on this machine reach it. Any other "
              "address needs --api-key (or --insecure): the answers come from your private documents.")),
          port: int = typer.Option(8088, help="Port (0: a free one; see the log or --port-file)."),
          port_file: Optional[Path] = typer.Option(None, "--port-file", help="Write the bound port to this file."),
          api_key: Optional[list[str]] = typer.Option(None, "--api-key", help=(
              f"Require 'Authorization: Bearer KEY' on /v1/... (repeatable; also --api-key-file and env "
              f"{EDGE_API_KEY_ENV}). Apps pass it as the OpenAI API key.")),
          api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="API keys, one per line."),
          insecure: bool = typer.Option(False, "--insecure", help=(
              "Serve on a non-loopback address without an API key (anyone who reaches it can read "
              "answers from your private documents and add or delete documents).")),
          model_name: str = typer.Option("smollm2-135m", "--model", help="Model (the id apps send as 'model')."),
          peer_timeout_s: float = PeerTimeoutOpt,
          header_timeout_s: float = typer.Option(15.0, "--header-timeout-s", min=0.1, help=(
              "Close a connection whose request headers have not arrived within this many seconds.")),
          body_timeout_s: float = typer.Option(30.0, "--body-timeout-s", min=0.1, help=(
              "A request body must arrive, and a streamed answer be read, within this many seconds.")),
          quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings only (default: one line per "
                                                                  "request and per answer).")) -> None:
    """Serve the device as a local OpenAI-compatible server, with a chat page at /.

    Answers are DRAGON over your private store: with the cloud when --cloud is given, else device-only.

    A lost cloud finishes the answer on the device, flagged in the answer's "dragon" field.

    Apps: base URL http://127.0.0.1:8088/v1, model smollm2-135m, API key: any (or your --api-key).

    OpenAI routes: /v1/models, /v1/chat/completions, /v1/completions (streamed or not).

    Documents: /v1/dragon/documents (GET: list; POST {"path": "/abs/path"}: ingest; DELETE ?source=...).

    Also /v1/dragon/status, /health and the chat page /. Logs go to stderr.

    Ctrl-C or SIGTERM stops it gracefully (running answers get 5 s).
    """
    from dragon_edge.serve.app import AppConfig
    from dragon_edge.serve.server import ServeOptions, serve as run_server
    from dragon_http.auth import load_api_keys
    from dragon_http.loopback import is_loopback

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        keys = load_api_keys(api_key or (), api_key_file, env_key=EDGE_API_KEY_ENV)
    except OSError as exc:
        raise typer.BadParameter(f"--api-key-file: {exc}") from None
    if not is_loopback(host) and not keys:
        if not insecure:
            typer.echo(f"error: --host {host} is not loopback: other machines could read answers from your private "
                       f"documents. Give --api-key (or --api-key-file, env {EDGE_API_KEY_ENV}), or --insecure.",
                       err=True)
            raise typer.Exit(2)
        logging.getLogger("dragon.edge.serve").warning(
            "serving on %s without an API key (--insecure): anyone who reaches it can read your private store", host)
    opts = ServeOptions(AppConfig(model_name, host, keys, body_timeout_s), Path(store), cloud, token, engine,
                        port, port_file, peer_timeout_s, header_timeout_s)
    asyncio.run(run_server(opts))


@app.command()
def delete(source: Optional[str] = typer.Argument(None, help="A source: file path, folder path or SDK source name."),
           store: str = StoreOpt,
           everything: bool = typer.Option(False, "--all", help="Delete every source: empty the store."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before deleting every file under a folder.")
           ) -> None:
    """Remove a source and its passages from the store. A folder path (not itself a source)
    removes every file under it after a confirmation (or --yes); emptying the store needs --all."""
    if everything == (source is not None):
        typer.echo("error: name one source to delete, or --all to empty the store", err=True)
        raise typer.Exit(2)
    st = _open_store(store, create=False)
    if everything:
        removed = st.delete_all()
        typer.echo(f"deleted every source ({removed} passages); {_store_line(st)}")
        return
    from dragon_edge.store.names import names_one_source

    keys = st.sources_matching(source)
    if keys and not names_one_source(keys, source):
        _confirm_folder_delete(st, source, keys, yes)
    removed = st.delete(source)  # no match: UnknownSource, one line
    typer.echo(f"deleted {len(keys)} source{'s' * (len(keys) != 1)} ({removed} passages); {_store_line(st)}")


def _confirm_folder_delete(st, source: str, keys: list[str], yes: bool) -> None:
    """``delete /`` used to empty the store without a word."""
    from dragon_edge.store import WouldDeleteEverything

    if len(keys) == st.stats().sources:
        raise WouldDeleteEverything(
            f"{source} is not a source but a folder holding every source in the store ({len(keys)}); "
            "to empty the store, run: dragon-edge delete --all")
    question = f"{source} is not a source but a folder holding {len(keys)} sources (e.g. {keys[0]}). Delete them?"
    if yes:
        return
    if not sys.stdin.isatty():
        typer.echo(f"error: {question} Pass --yes to confirm.", err=True)
        raise typer.Exit(2)
    typer.confirm(question, abort=True)


def one_line_error(exc: BaseException) -> str:
    """``error: ...`` on one line: typed errors say what to do; others name their type."""
    from dragon_core.errors import DragonError

    text = str(exc) if isinstance(exc, (DragonError, OSError)) else f"{type(exc).__name__}: {exc}"
    return "error: " + " ".join(text.split()) + ("" if isinstance(exc, DragonError) else
                                                 f" (--debug or {DEBUG_ENV}=1 shows the traceback)")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. ``--debug`` is taken from anywhere on the command line (people add it at the
    end); without it an error is one line on stderr and exit 1, not a traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    if "--debug" in args:
        args = ["--debug"] + [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="dragon-edge")
    except KeyboardInterrupt:
        if debug:
            raise
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        typer.echo(one_line_error(exc), err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
