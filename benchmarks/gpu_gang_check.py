"""Quick check of the in-engine gang path on a machine (the GPU's vLLM 0.26): open a gang of 3
SmolLM2 streams, draft 20 greedy tokens, report the tokens, chunks and repairs as JSON
(``--out FILE``). A hang is cut after 150 s with a traceback (faulthandler)."""
import asyncio, sys, time, faulthandler
faulthandler.dump_traceback_later(150, exit=True)

async def main():
    from dragon_vllm.engine import make_engine
    from dragon_host.models import get_model
    from transformers import AutoTokenizer
    d = str(get_model("smollm2-135m").hf_dir())
    tok = AutoTokenizer.from_pretrained(d)
    t0 = time.time()
    eng = make_engine(d, top_k=20, max_num_seqs=64, max_model_len=1024, enforce_eager=True)
    t_up = time.time() - t0
    print("engine up", t_up, "async", eng.llm.vllm_config.scheduler_config.async_scheduling, eng.llm.vllm_config.scheduler_config.scheduler_cls, flush=True)
    prompts = [tok.encode(f"Document {i}: Lyon is a city in France known for food and silk. Question: What is Lyon famous for? Answer:") for i in range(3)]
    g = await eng.open_group(prompts, 1.0, [1.0, 0.3, -0.5], 24)
    print("opened", flush=True)
    toks = []
    for step in range(20):
        d_ = await asyncio.wait_for(g.next_side_dist(0), 30)
        toks.append(d_.argmax()); await g.append([toks[-1]])
        print(step, toks[-1], flush=True)
    print("chunks", g.chunks, "served", g.served_from_chunk, "repairs", g.repairs, flush=True)
    import json, vllm
    sched = eng.llm.vllm_config.scheduler_config
    record = dict(vllm=vllm.__version__, async_scheduling=sched.async_scheduling, scheduler_cls=str(sched.scheduler_cls),
                  tokens=[int(t) for t in toks], chunks=g.chunks, served_from_chunk=g.served_from_chunk,
                  repairs=g.repairs, engine_start_s=round(t_up, 1))
    if len(sys.argv) > 2 and sys.argv[1] == "--out":
        open(sys.argv[2], "w").write(json.dumps(record, indent=2) + "\n")
    await g.close()
    await eng.close()

if __name__ == "__main__":
    asyncio.run(main())
