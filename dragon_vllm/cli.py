"""``dragon-cloud``: serve DRAGON's cloud side (device link + OpenAI API) and build public indexes."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional

import typer

from dragon_core.idle import DEFAULT_REQUEST_IDLE_S
from dragon_core.liveness import DEFAULT_PEER_TIMEOUT_S

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="DRAGON cloud: the same model under vLLM, over a public corpus.")


@app.command()
def serve(
    model: str = typer.Option("smollm2-135m", help="Registered model name (dragon-models list)."),
    index: Optional[Path] = typer.Option(None, help="Public index folder (dragon-cloud index ...). "
                                                   "Without it the cloud decodes from the query alone."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000, help="0 picks a free port (see --port-file)."),
    port_file: Optional[Path] = typer.Option(None, help="Write the bound port here as soon as it is bound "
                                                        "(before the model loads), for scripts using --port 0."),
    auth_token: str = typer.Option(os.environ.get("DRAGON_TOKEN", ""), "--auth-token",
                                   help="Token devices must present (env DRAGON_TOKEN); empty = no check."),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key", help=(
        "Key the OpenAI routes require as 'Authorization: Bearer <key>' (repeatable; also env "
        "DRAGON_API_KEY and --api-key-file). No key: the OpenAI routes are open.")),
    api_key_file: Optional[Path] = typer.Option(None, "--api-key-file", help="API keys, one per line."),
    protect_probes: bool = typer.Option(False, "--protect-probes", help="/health and /metrics need an API key too."),
    header_timeout_s: float = typer.Option(15.0, "--header-timeout-s", min=0.1, help=(
        "Close a connection whose request headers have not all arrived within this (also the "
        "idle keep-alive time between requests).")),
    body_timeout_s: float = typer.Option(30.0, "--body-timeout-s", min=0.1, help=(
        "408 for a request body not received within this; a streamed answer whose client "
        "reads nothing for this long is ended.")),
    k: int = typer.Option(2, help="Default public passages per request (the OpenAI API's `k` overrides)."),
    logprobs_k: int = typer.Option(20, "--logprobs-k", "--top-k", help=(
        "Log-probs read from vLLM per stream and step (--top-k: the old name). Not a request's "
        "top_k (sampling) nor its dist_top_k (the wire's compression).")),
    max_num_seqs: int = typer.Option(128, help="vLLM max_num_seqs; open streams stay below it."),
    max_model_len: int = typer.Option(2048),
    kv_cache_gib: Optional[float] = typer.Option(None, help="CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)."),
    gpu_memory_utilization: Optional[float] = typer.Option(None),
    in_engine: bool = typer.Option(True, "--in-engine/--per-document", help=(
        "Mix a request's document streams inside vLLM (gang scheduler + logits processor, several "
        "tokens drafted per chunk), or read each document's top-K and mix in Python, one token per "
        "engine round trip (the older, slower path).")),
    chunk_tokens: int = typer.Option(0, "--chunk-tokens", min=0, help=(
        "In-engine path: tokens the cloud drafts per engine chunk without a round trip; 0 (the "
        "default) = draft until the device rejects a draft or the answer's max_tokens, with no "
        "round trip at all in between.")),
    rollback: str = typer.Option("reopen", "--rollback", help=(
        "In-engine path: how a rejected draft rolls the gang back. 'reopen' (the default, measured "
        "faster): abort the gang's vLLM requests and reopen them (the prefix cache restores whole "
        "blocks). 'in-place': truncate the sessions inside the gang scheduler (no new requests); "
        "verified on vLLM 0.32 (sync scheduler) and 0.26 (async), refused elsewhere unless "
        "DRAGON_ALLOW_UNVERIFIED_ROLLBACK=1.")),
    retriever: str = typer.Option("dense", "--retriever", help=(
        "How the public passages are selected: 'dense' (the index's faiss search) or 'bm25' (BM25 over "
        "the index's passages, built in memory at start; the dense R still weighs them, so the device "
        "mixes both sides' passages as before). Iterative retrieval and RaLMSpec use the same one.")),
    lookahead: str = typer.Option("off", "--lookahead", help=(
        "IVF public index: search through TeleRAG's cluster cache, 'cpu' (a host-memory copy: checks "
        "the path, no speed-up) or 'gpu' (IVF-Flat lists cached in GPU memory, scanned there); the "
        "same passages as 'off'. Hit rate and retrieval time in /metrics.")),
    lookahead_fraction: float = typer.Option(0.15, "--lookahead-fraction", min=0.0, max=1.0, help=(
        "Cluster cache size, as a fraction of the IVF lists' bytes (GPU memory with --lookahead gpu).")),
    speculative_retrieval: bool = typer.Option(True, "--speculative-retrieval/--no-speculative-retrieval", help=(
        "Requests with retrieve_every (iterative retrieval): at each boundary decode at once over passages "
        "from the request's cache (RaLMSpec) while the real retrieval runs beside; drafts wait for its "
        "verdict, so answers are the same either way.")),
    data_parallel_size: int = typer.Option(1, "--data-parallel-size", min=1, help=(
        "Data-parallel ranks (one engine core, one GPU each). Each request is placed on a rank once "
        "(--placement) and every chunk of its document streams is pinned there. 1 = one engine, as before.")),
    data_parallel_backend: str = typer.Option("vllm", "--data-parallel-backend", help=(
        "'vllm': vLLM's own data parallel (one AsyncLLM; a lost engine core stops every rank). "
        "'engines': one independent vLLM engine per rank in this process (a lost rank leaves the others).")),
    data_parallel_size_local: Optional[int] = typer.Option(None, "--data-parallel-size-local", min=1, help=(
        "Several nodes (vLLM's multi-node data parallel): the ranks on this node (the first ones); the "
        "others run `dragon-cloud headless` on their nodes and join at --data-parallel-address.")),
    data_parallel_address: Optional[str] = typer.Option(None, "--data-parallel-address", help=(
        "Several nodes: this node's address, which the other nodes' engine cores dial.")),
    data_parallel_rpc_port: Optional[int] = typer.Option(None, "--data-parallel-rpc-port", help=(
        "Several nodes: the port they dial (vLLM's data-parallel handshake).")),
    ranks_per_gpu: int = typer.Option(1, "--ranks-per-gpu", min=1, help=(
        "With --data-parallel-backend engines: put this many ranks on each GPU, each with that share of "
        "--gpu-memory-utilization (e.g. two ranks on one GPU when no second GPU is there).")),
    placement: str = typer.Option("kv", "--placement", help=(
        "With --data-parallel-size > 1: 'kv' (the rank whose prefix cache holds the request's document "
        "blocks, else the least loaded), 'least_loaded' or 'round_robin'.")),
    api_servers: int = typer.Option(1, "--api-servers", min=1, help=(
        "API server processes on one engine core (as vllm serve --api-server-count): each serves the "
        "device links and OpenAI requests it accepts on the shared port (SO_REUSEPORT) within 1/N of the "
        "admission budget; /health and /metrics answer per process. 1 = one process, as before.")),
    max_k: int = typer.Option(16, help="Largest k a device may ask for."),
    max_tokens: int = typer.Option(1024, help="Largest max_tokens a request may ask for."),
    emulate_decode_ms: float = typer.Option(0.0, help="Experiments: add this to every cloud draft on the "
                                                       "link (a slower cloud)."),
    peer_timeout_s: float = typer.Option(DEFAULT_PEER_TIMEOUT_S, "--peer-timeout-s", help=(
        "Drop a device after this many seconds without a frame from it (its requests end, their "
        "streams and KV are freed); devices ping every 0.5 s. 0 = wait for TCP.")),
    request_idle_timeout_s: float = typer.Option(DEFAULT_REQUEST_IDLE_S, "--request-idle-timeout-s", help=(
        "End a request the cloud has waited on this long with nothing from its device (even on a "
        "connection that answers pings): the device gets Error request_idle_timeout, the streams "
        "and KV are freed. 0 = never.")),
    link_tokens_file: Optional[Path] = typer.Option(None, "--link-tokens-file", help=(
        "Per-device link tokens, one 'NAME TOKEN' per line: each name is an identity with its own "
        "quotas (devices on the shared --auth-token are counted by address).")),
    max_requests_per_identity: int = typer.Option(64, "--max-requests-per-identity", min=0, help=(
        "Open link requests per device identity over all its connections; 0 = no limit.")),
    max_streams_per_identity: Optional[int] = typer.Option(None, "--max-streams-per-identity", min=0, help=(
        "Engine streams (k per request) per device identity; default half of the engine's stream "
        "slots; 0 = no limit.")),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Start the cloud: WebSocket link at /v1/dragon/link, OpenAI API at /v1, /health, /metrics."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dragon").setLevel(logging.INFO)
    # bind before the engine loads: vLLM picks free ports of its own while it starts, and a port
    # chosen but not yet bound could be handed to it
    if api_servers > 1:
        _check_api_servers(data_parallel_size)
    # --api-servers N: the port is held (bound, not listening) and each API server listens on it too
    sock = socket.create_server((host, port)) if api_servers == 1 else _hold_shared_port(host, port)
    port = sock.getsockname()[1]
    if port_file is not None:
        port_file.write_text(f"{port}\n")
    from aiohttp import web

    from dragon_vllm.link import LinkLimits
    from dragon_vllm.loader import load_cloud
    from dragon_http.auth import load_api_keys
    from dragon_vllm.server import ServerConfig, build_app

    from dragon_vllm.engine import UnverifiedRollback, check_rollback

    try:
        rollback = check_rollback(rollback)
    except (ValueError, UnverifiedRollback) as exc:
        raise typer.BadParameter(f"--rollback: {exc}") from None
    if lookahead not in ("off", "cpu", "gpu"):
        raise typer.BadParameter(f"--lookahead must be off, cpu or gpu, not {lookahead!r}")
    if lookahead != "off" and index is None:
        raise typer.BadParameter("--lookahead needs a public index (--index)")
    if retriever not in ("dense", "bm25"):
        raise typer.BadParameter(f"--retriever must be dense or bm25, not {retriever!r}")
    if retriever == "bm25" and (index is None or lookahead != "off"):
        raise typer.BadParameter("--retriever bm25 needs a public index (--index) and no --lookahead "
                                 "(BM25 does not probe IVF clusters)")
    if data_parallel_size > 1:
        from dragon_vllm.data_parallel import DataParallelUnsupported, check_data_parallel
        from dragon_vllm.placement import POLICIES

        if placement not in POLICIES:
            raise typer.BadParameter(f"--placement must be one of {', '.join(POLICIES)}, not {placement!r}")
        try:
            check_data_parallel(data_parallel_size, data_parallel_backend, ranks_per_gpu)
        except DataParallelUnsupported as exc:
            raise typer.BadParameter(str(exc)) from None
    nodes = _nodes(data_parallel_size, data_parallel_backend, data_parallel_size_local, data_parallel_address,
                   data_parallel_rpc_port)
    if rollback == "in_place" and not in_engine:
        raise typer.BadParameter("--rollback in-place needs the in-engine path (not --per-document)")
    try:
        api_keys = load_api_keys(api_key or (), api_key_file)
    except OSError as exc:
        raise typer.BadParameter(f"--api-key-file: {exc}") from None
    if protect_probes and not api_keys:
        raise typer.BadParameter("--protect-probes needs an API key (--api-key, --api-key-file or DRAGON_API_KEY)")

    from dragon_vllm.device_tokens import load_device_tokens

    try:
        device_tokens = load_device_tokens(link_tokens_file) if link_tokens_file else {}
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"--link-tokens-file: {exc}") from None

    cloud_kwargs = dict(model=model, index_dir=index, default_k=k, logprobs_k=logprobs_k, max_num_seqs=max_num_seqs,
                        max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                        gpu_memory_utilization=gpu_memory_utilization,
                        emulate_decode_ms=emulate_decode_ms, mixing=in_engine,
                        chunk_tokens=chunk_tokens, rollback=rollback, lookahead=lookahead,
                        lookahead_fraction=lookahead_fraction,
                        speculative_retrieval=speculative_retrieval, retriever=retriever,
                        **_data_parallel(data_parallel_size, data_parallel_backend, placement, ranks_per_gpu), **nodes)
    limits = LinkLimits(max_k=max_k, max_tokens=max_tokens, peer_timeout_s=peer_timeout_s,
                        request_idle_timeout_s=request_idle_timeout_s,
                        max_requests_per_identity=max_requests_per_identity,
                        max_streams_per_identity=max_streams_per_identity)
    server_config = ServerConfig(served_model=model, auth_token=auth_token or None, limits=limits, api_keys=api_keys,
                                 protect_probes=protect_probes, body_timeout_s=body_timeout_s)
    run_app_kwargs = dict(shutdown_timeout=10.0,
                          keepalive_timeout=header_timeout_s,  # aiohttp's deadline for a request's headers too
                          lingering_time=min(10.0, body_timeout_s))  # reading the rest of a refused body: bounded

    async def make_app() -> web.Application:
        cloud = await load_cloud(**cloud_kwargs)
        app = build_app(cloud, server_config)
        app["dragon_link"].device_tokens.update(device_tokens)
        return app

    if api_servers > 1:
        from dragon_vllm.api_servers import ServePlan, serve_api_servers

        typer.echo(f"dragon-cloud: starting {model} on http://{host}:{port}, {api_servers} API servers "
                   "(Ctrl-C stops)", err=True)
        plan = ServePlan(host, port, cloud_kwargs, server_config, device_tokens, run_app_kwargs, verbose)
        sys.exit(serve_api_servers(plan, api_servers))  # ``sock`` holds the port until then

    typer.echo(f"dragon-cloud: starting {model} on http://{host}:{port} (Ctrl-C stops)", err=True)
    from dragon_vllm.profiling import profiled_if_asked

    with profiled_if_asked():  # DRAGON_PROFILE=FILE: where the event loop's time goes
        web.run_app(make_app(), sock=sock, print=lambda msg: typer.echo(msg, err=True), **run_app_kwargs)


def _data_parallel(size: int, backend: str, placement: str, ranks_per_gpu: int = 1) -> dict:
    """load_cloud's data-parallel options; none for one rank (the single-engine path, unchanged)."""
    if size <= 1:
        return {}
    return dict(data_parallel_size=size, data_parallel_backend=backend, placement=placement,
                ranks_per_gpu=ranks_per_gpu)


def _nodes(size: int, backend: str, size_local: int | None, address: str | None, rpc_port: int | None) -> dict:
    """The head node's multi-node options (vLLM's own), checked; none on one node."""
    given = {k: v for k, v in dict(data_parallel_size_local=size_local, data_parallel_address=address,
                                   data_parallel_rpc_port=rpc_port).items() if v is not None}
    if not given:
        return {}
    if size <= 1 or backend != "vllm":
        raise typer.BadParameter("--data-parallel-size-local/-address/-rpc-port need --data-parallel-size > 1 and "
                                 "--data-parallel-backend vllm (vLLM's multi-node data parallel)")
    if size_local is None or address is None or rpc_port is None:
        raise typer.BadParameter("several nodes need all three: --data-parallel-size-local, --data-parallel-address "
                                 "and --data-parallel-rpc-port")
    if size_local >= size:
        raise typer.BadParameter(f"--data-parallel-size-local {size_local} leaves no rank of {size} to other nodes")
    return given


@app.command()
def headless(
    model: str = typer.Option("smollm2-135m", help="Registered model name: the head's --model."),
    data_parallel_size: int = typer.Option(..., "--data-parallel-size", min=2, help="All ranks, on every node."),
    data_parallel_size_local: int = typer.Option(1, "--data-parallel-size-local", min=1,
                                                 help="Ranks on this node."),
    data_parallel_start_rank: int = typer.Option(..., "--data-parallel-start-rank", min=1,
                                                 help="This node's first rank."),
    data_parallel_address: str = typer.Option(..., "--data-parallel-address", help="The head node's address."),
    data_parallel_rpc_port: int = typer.Option(..., "--data-parallel-rpc-port", help="The head node's port."),
    logprobs_k: int = typer.Option(20, "--logprobs-k", "--top-k", help="As the head's."),
    max_num_seqs: int = typer.Option(128, help="As the head's."),
    max_model_len: int = typer.Option(2048, help="As the head's."),
    kv_cache_gib: Optional[float] = typer.Option(None, help="CPU KV cache size (VLLM_CPU_KVCACHE_SPACE)."),
    gpu_memory_utilization: Optional[float] = typer.Option(None),
    in_engine: bool = typer.Option(True, "--in-engine/--per-document", help="As the head's."),
    rollback: str = typer.Option("reopen", "--rollback", help="As the head's."),
    verbose: bool = typer.Option(False, "-v", "--verbose"),
) -> None:
    """Run data-parallel ranks for a `dragon-cloud serve` on another node (vLLM's multi-node data
    parallel): this node's engine cores join the head at --data-parallel-address; requests are
    placed and pinned by the head, and devices connect to the head. The engine options must
    equal the head's."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from dragon_host.models import get_model
    from dragon_vllm.headless import HeadlessUnsupported, check_headless, run_headless

    try:
        check_headless(data_parallel_size, data_parallel_size_local, data_parallel_start_rank)
    except HeadlessUnsupported as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"dragon-cloud: ranks {data_parallel_start_rank}..{data_parallel_start_rank + data_parallel_size_local - 1}"
               f" of {data_parallel_size} for the head at {data_parallel_address}:{data_parallel_rpc_port} "
               "(Ctrl-C stops)", err=True)
    run_headless(str(get_model(model).hf_dir()), data_parallel_size=data_parallel_size,
                 data_parallel_size_local=data_parallel_size_local, data_parallel_start_rank=data_parallel_start_rank,
                 data_parallel_address=data_parallel_address, data_parallel_rpc_port=data_parallel_rpc_port,
                 logprobs_k=logprobs_k, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                 kv_cache_gib=kv_cache_gib, gpu_memory_utilization=gpu_memory_utilization, mixing=in_engine,
                 rollback=rollback)


def _check_api_servers(data_parallel_size: int) -> None:
    """--api-servers > 1: refused before anything binds or loads, with the reason."""
    if data_parallel_size > 1:
        raise typer.BadParameter("--api-servers > 1 with --data-parallel-size > 1 is not supported yet")
    from dragon_vllm.vllm_frontends import ApiServersUnsupported, check_api_servers_supported

    try:
        check_api_servers_supported()
    except ApiServersUnsupported as exc:
        raise typer.BadParameter(f"--api-servers: {exc}") from None


def _hold_shared_port(host: str, port: int) -> socket.socket:
    from dragon_vllm.shared_port import reserve

    return reserve(host, port)


# add_help_option=False: `dragon-cloud index build --help` is the corpus CLI's help, not typer's
@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def index(ctx: typer.Context) -> None:
    """Build or search a public index: `dragon-cloud index build OUT INPUT...`, `... search OUT QUERY`."""
    from dragon_vllm.corpus import cli as corpus_cli

    sys.exit(corpus_cli.main(ctx.args))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
