#!/usr/bin/env bash
# The GPU machine's part of the cloud benchmarks and checks (issue 10), one stage per call:
#   bash benchmarks/gpu_run.sh tests      # test_gang + test_vllm_engine on vLLM 0.26 (bf16)
#   python benchmarks/gpu_gang_check.py --out $OUT/gang_check.json   # 20 s: does a gang decode there?
#   bash benchmarks/gpu_run.sh streams    # engine level, SmolLM2-135M: gang / sessions / plain vLLM
#   bash benchmarks/gpu_run.sh rollback   # issue 10: rollback in place on vLLM 0.26, tests + reopen vs in place
#   bash benchmarks/gpu_run.sh streams17  # engine level, 1.7B Llama shape, dummy weights
#   bash benchmarks/gpu_run.sh load       # through the link: bench_cloud_load
#   bash benchmarks/gpu_run.sh load --levels 256 --cloud-args "--api-servers 4" --out "$OUT/cloud_load_h200_api4.json"
#        # (next GPU session) the same through 4 API server processes on one engine core; vLLM 0.26
#        # is unverified for it: run with DRAGON_ALLOW_UNVERIFIED_API_SERVERS=1 and record the result;
#        # compare to cloud_load_h200.json's 0.11 of plain at 256 (also --api-servers 4 directly)
#   bash benchmarks/gpu_run.sh profile WHEEL_DIR --questions Q --passages P   # py-spy of the gang at 256 requests,
#        engine level and through the link (raw stacks -> $OUT/spy_*.txt; benchmarks/pyspy_summary.py reads them)
#   bash benchmarks/gpu_run.sh latency --conditions rtt300 rtt0 --budget-s 450   # issue 13: bench_latency_rtt,
#        three devices on cores 0-3 / 4-7 / 8-11, the cloud and the proxies on 12-15 (data: --data DIR)
#   bash benchmarks/gpu_run.sh qa --data /tmp/qa   # issue 13: bench_quality_qa, 200 NQ questions, the device
#        on cores 0-3, the cloud on the GPU + cores 4-15; in calls of ~8 min that --resume (repeat the
#        call until it prints "complete": true); -> $OUT/quality_qa_h200.{json,png,answers.jsonl}
#   bash benchmarks/gpu_run.sh retrieval   # issue 15: TeleRAG at 10M synthetic passages (faiss-cpu only, no vLLM)
#   bash benchmarks/gpu_run.sh ttft --data .gpu/qa   # issue 15: TTFT with a 1k vs a BIG (10M) passage index, end
#        to end (dragon-cloud serve --lookahead gpu and plain IVF vs the 1k index; the llama.cpp device)
#   bash benchmarks/gpu_run.sh iterative --data .gpu/qa   # issue 16: RaLMSpec, decoding on the GPU, the
#        exact 10M index on CPU cores (bench_iterative --engine vllm) -> $OUT/iterative_h200_vllm.json
#   DATA=.gpu/data bash benchmarks/gpu_run.sh dp   # issue 17 (2 GPUs): data-parallel tests, placement
#        KV-aware vs round robin (bench_placement), throughput at 1 and 2 ranks (bench_cloud_load)
#   DATA=.gpu/data bash benchmarks/gpu_run.sh dp1  # issue 17 on one GPU: two ranks on it (--ranks-per-gpu 2)
# Stage vLLM first (../shared/gpu/README.md); results and logs go under $OUT.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1
export DRAGON_CACHE=${DRAGON_CACHE:-/tmp/dragon-cache} NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ "${1:-}" = retrieval ]; then
  # issue 15, TeleRAG: needs only faiss-cpu (carry .gpu/faiss: pip install --target /tmp/site) and the
  # machine's torch. 10M synthetic vectors (15 GB on /tmp), GPU-built IVF-Flat, faiss-cpu on 16
  # threads vs the lookahead GPU store (15% budget) vs every list on the GPU; rows -> $OUT as they come
  shift
  python -m benchmarks.bench_retrieval --n ${N:-10000000} --corpus /tmp/synth --workers 16 --threads 16 \
    --kinds ivf-flat --nlist ${NLIST:-4096} --nprobe ${NPROBE:-32 128} --queries ${QUERIES:-200} --batch 64 \
    --store gpu --gpu-whole-index --spaced --build-device cuda --skip-flat --out "$OUT/retrieval_h200.json" "$@" \
    > "$OUT/retrieval.log" 2>&1; rc=$?
  tail -12 "$OUT/retrieval.log" | cut -c1-1500; exit $rc
fi
python -m dragon_host.models prepare smollm2-135m > "$OUT/prepare.log" 2>&1 || { tail -20 "$OUT/prepare.log"; exit 1; }
case "${1:-}" in
  tests)
    # faulthandler: a hang prints every thread's stack instead of nothing
    timeout 400 python -m pytest -x -v -p no:cacheprovider -o faulthandler_timeout=170 tests/engines/test_gang.py \
      tests/engines/test_vllm_engine.py > "$OUT/tests_h200.log" 2>&1; rc=$?
    grep -E "passed|failed|error" "$OUT/tests_h200.log" | tail -5; exit $rc ;;
  streams)
    taskset -c 2-15 python -m benchmarks.bench_vllm_streams --levels 1 8 32 64 128 256 --k 4 --steps 64 \
      --chunk-tokens 0 16 --rollback-every 6 --device h200 --out "$OUT/vllm_streams_h200.json" > "$OUT/streams.log" 2>&1; rc=$?
    grep '^{' "$OUT/streams.log" | tail -6; tail -3 "$OUT/streams.log"; exit $rc ;;
  rollback)
    # rollback in place on vLLM 0.26 (Model Runner V1 under the processor, async scheduling): its
    # tests first (with -s: the engine core's own log lands in the file too), then the gang path at
    # every level with in place as the engine's mode, against plain vLLM, and the cost of one
    # rollback both ways (reopen, in place)
    export DRAGON_ALLOW_UNVERIFIED_ROLLBACK=1
    timeout 200 python -m pytest -x -v -s -p no:cacheprovider -o faulthandler_timeout=120 \
      tests/engines/test_rollback_in_place.py > "$OUT/rollback_tests_h200.log" 2>&1; trc=$?
    grep -E "PASSED|FAILED|ERROR|passed|failed|Timeout" "$OUT/rollback_tests_h200.log" | tail -14
    taskset -c 2-15 timeout 380 python -m benchmarks.bench_vllm_streams --levels ${LEVELS:-1 8 32 64 128 256} --k 4 \
      --steps 64 --chunk-tokens 0 --rollback-every 6 --rollback reopen in_place --repeats ${REPEATS:-1} --device h200 \
      --out "$OUT/vllm_streams_h200_rollback.json" > "$OUT/rollback_streams.log" 2>&1; rc=$?
    grep '^{' "$OUT/rollback_streams.log" | tail -6 | cut -c1-900; tail -3 "$OUT/rollback_streams.log"
    exit $(( trc ? trc : rc )) ;;
  streams17)
    taskset -c 2-15 python -m benchmarks.bench_vllm_streams --levels 1 32 256 --k 4 --steps 48 \
      --shape 1.7b --device h200 --out "$OUT/vllm_streams_h200_1.7b.json" > "$OUT/streams17.log" 2>&1; rc=$?
    grep '^{' "$OUT/streams17.log" | tail -6; tail -3 "$OUT/streams17.log"; exit $rc ;;
  load)
    shift
    # several API server processes (the one-process API thread saturates at 256 devices):
    #   DRAGON_ALLOW_UNVERIFIED_API_SERVERS=1 bash benchmarks/gpu_run.sh load --levels 256 --cloud-args "--api-servers 4"
    # ../shared/data is not on that machine: carry the passages and questions (e.g. under .gpu/data)
    python -m benchmarks.bench_cloud_load --device h200 --device-cores 0-3 --cloud-cores 4-15 \
      --gpu-memory-utilization 0.85 --out "$OUT/cloud_load_h200.json" "$@" > "$OUT/load.log" 2>&1; rc=$?
    grep '^{' "$OUT/load.log" | tail -8; tail -5 "$OUT/load.log"; exit $rc ;;
  profile)
    shift; wheels=$1; shift
    pip install -q --no-deps --target /tmp/pyspy "$wheels"/py_spy-*.whl > /dev/null 2>&1
    spy="/tmp/pyspy/bin/py-spy record --subprocesses --nonblocking --format raw --rate 100"
    $spy -o "$OUT/spy_streams.txt" -- taskset -c 2-15 python -m benchmarks.bench_vllm_streams --levels 256 --k 4 \
      --steps 64 --chunk-tokens 0 --device h200 --out "$OUT/vllm_streams_prof.json" > "$OUT/streams_prof.log" 2>&1
    grep '^{' "$OUT/streams_prof.log" | tail -2
    # the same without Model Runner V2 for plain decoding: how much of the gap is V1 (which a processor forces)
    VLLM_USE_V2_MODEL_RUNNER=0 taskset -c 2-15 python -m benchmarks.bench_vllm_streams --levels 64 256 --k 4 --steps 64 \
      --chunk-tokens 0 --device h200 --out "$OUT/vllm_streams_v1.json" > "$OUT/streams_v1.log" 2>&1
    grep '^{' "$OUT/streams_v1.log" | tail -2
    $spy -o "$OUT/spy_load.txt" -- python -m benchmarks.bench_cloud_load --device h200 --device-cores 0-3 \
      --cloud-cores 4-15 --gpu-memory-utilization 0.85 --levels 256 --no-plain --max-questions 64 \
      --out "$OUT/cloud_load_prof.json" "$@" > "$OUT/load_prof.log" 2>&1; rc=$?
    grep '^{' "$OUT/load_prof.log" | tail -2 | cut -c1-600; tail -3 "$OUT/load_prof.log"; ls -la "$OUT"; exit $rc ;;
  latency)
    shift
    python -m benchmarks.bench_latency_rtt --device-cores 0-3 4-7 8-11 --cloud-cores 12-15 \
      --gpu-memory-utilization 0.5 --label "H200 cloud, llama.cpp devices on 4 cores each" "$@" > "$OUT/latency.log" 2>&1; rc=$?
    tail -40 "$OUT/latency.log"; exit $rc ;;
  qa)
    shift
    # The device runtime (llama.cpp, 4 threads, and its retriever) is this process, pinned to 0-3;
    # the dragon-cloud serve it starts (vLLM on the GPU) is pinned to 4-15. 200 questions x 5-6
    # modes outlast one call (10 min): each call answers for --budget-s, then writes the result of
    # the questions answered so far; the next call --resume's the answers file, kept in $QA_RUN
    # (/tmp: it lasts while the machine stays warm; a machine held 30 min goes back: then, after
    # staging again, copy the last call's $OUT/quality_qa_h200.answers.jsonl, carried, into $QA_RUN
    # first). ../shared/data is not there: carry nq_open_passages/ and wiki_passages_sample/ and
    # pass --data.
    QA_RUN=${QA_RUN:-/tmp/qa_run}
    mkdir -p "$QA_RUN"
    python -m benchmarks.bench_quality_qa --device-cores 0-3 --cloud-cores 4-15 --gpu-memory-utilization 0.5 \
      --cloud-engine "vLLM 0.26 on an H200 (bf16)" --budget-s 480 --resume --quiet \
      --out "$QA_RUN/quality_qa_h200.json" "$@" > "$OUT/qa.log" 2>&1; rc=$?
    cp "$QA_RUN"/quality_qa_h200.* "$OUT"/ 2>/dev/null
    grep -o '"complete": [a-z]*' "$OUT/quality_qa_h200.json" | head -1; tail -25 "$OUT/qa.log"; exit $rc ;;
  ttft)
    shift
    # issue 15's TTFT goal (benchmarks/bench_ttft_index.py). Carry .gpu/faiss (pip install --no-deps
    # --target /tmp/site, as for retrieval) and the QA data (nq_open_passages/ + wiki_passages_sample/,
    # e.g. .gpu/qa, passed as --data). One call: the indexes first, in a process on every core (BIG
    # SYNTHETIC vectors, reusing retrieval's /tmp/synth when it has BIG rows; the IVF's k-means and
    # assignment on the GPU; ~34 GB on /tmp, kept while the machine is warm, so a second call skips
    # it), then one dragon-cloud serve per configuration, started one by one (vLLM sizes its KV cache
    # from the free memory), pinned to cores 4-15, and the device (llama.cpp) of this process on 0-3,
    # asking until TTFT_BUDGET_S since the script began; results are written before the clouds stop.
    W=${TTFT_WORK:-/tmp/dragon_ttft}
    size=(--big ${BIG:-10000000} --nlist ${NLIST:-4096} --nprobe ${NPROBE:-32} --work "$W" --corpus /tmp/synth)
    python -m benchmarks.bench_ttft_index --build-only "${size[@]}" --build-device cuda --workers 16 "$@" \
      > "$OUT/ttft_build.log" 2>&1 || { tail -20 "$OUT/ttft_build.log"; exit 1; }
    tail -2 "$OUT/ttft_build.log" | cut -c1-600
    python -m benchmarks.bench_ttft_index "${size[@]}" --configs ${CONFIGS:-small big:gpu big:off} --one-by-one \
      --device-cores 0-3 --cloud-cores 4-15 --gpu-memory-utilization ${GPU_UTIL:-0.25} --questions ${QUESTIONS:-10} \
      --repeats ${REPEATS:-2} --budget-s $(( ${TTFT_BUDGET_S:-520} - SECONDS )) --out "$OUT/ttft_index_h200.json" \
      --label "H200 cloud (vLLM 0.26), llama.cpp device on 4 cores" "$@" > "$OUT/ttft.log" 2>&1; rc=$?
    cp "$W"/cloud-*.log "$OUT"/ 2>/dev/null
    tail -8 "$OUT/ttft.log" | cut -c1-1500; exit $rc ;;
  dp)
    # issue 17, on the 2-GPU machine (nvidia-h200-x2): the cloud on vLLM's own data parallel, one
    # rank per GPU. The CPU-checked tests first (every chunk on its pinned rank, placement by document
    # blocks, a lost rank), then placement KV-aware vs round robin on real ranks (bench_placement:
    # the hit rate vLLM reports and TTFT), then throughput through the link at 1 and 2 ranks, 256 and
    # 512 requests, k = 4 (bench_cloud_load; --data-parallel-size 1 is the single-engine cloud).
    # ../shared/data is not there: carry nq_open/ and wiki_passages_sample/ under $DATA (.gpu/data).
    DATA=${DATA:-.gpu/data}
    timeout 300 python -m pytest -x -v -p no:cacheprovider -o faulthandler_timeout=200 \
      tests/engines/test_data_parallel.py > "$OUT/dp_tests_h200.log" 2>&1; trc=$?
    grep -E "passed|failed|error" "$OUT/dp_tests_h200.log" | tail -5
    timeout 300 python -m benchmarks.bench_placement --ranks 2 --requests 20000 --cache-blocks 2000 20000 \
      --engine-requests ${DP_REQUESTS:-512} --concurrency ${DP_CONCURRENCY:-64} --max-extra-streams 32 \
      --data "$DATA" --out "$OUT/placement_h200.json" > "$OUT/placement.log" 2>&1; prc=$?
    grep '^{' "$OUT/placement.log" | tail -5 | cut -c1-600
    rc=0
    for n in 1 2; do
      python -m benchmarks.bench_cloud_load --device h200_dp$n --device-cores 0-3 --cloud-cores 4-31 \
        --gpu-memory-utilization 0.85 --levels 256 512 --cloud-k 4 --cloud-args "--data-parallel-size $n" \
        --questions "$DATA/nq_open/NQ-open.dev.jsonl" --passages "$DATA/wiki_passages_sample/flashrag_wiki18_sample_1000.jsonl" \
        --out "$OUT/cloud_load_h200_dp$n.json" > "$OUT/load_dp$n.log" 2>&1 || rc=$?
      grep '^{' "$OUT/load_dp$n.log" | tail -3 | cut -c1-600
    done
    exit $(( trc ? trc : (prc ? prc : rc) )) ;;
  dp1)
    # issue 17 when only one GPU is lent: two ranks on it (--data-parallel-backend engines
    # --ranks-per-gpu 2, each engine with half the memory), the same three parts as dp: the
    # data-parallel tests, placement KV-aware vs round robin on the real ranks (steady state:
    # --engine-warmup), then the cloud through the link at 1 rank and at 2 ranks on the one GPU.
    # Throughput gains need the second GPU (dp); this measures the placement and that the path runs.
    DATA=${DATA:-.gpu/data}
    timeout 240 python -m pytest -x -v -p no:cacheprovider -o faulthandler_timeout=200 \
      tests/engines/test_data_parallel.py > "$OUT/dp1_tests_h200.log" 2>&1; trc=$?
    grep -E "passed|failed|error" "$OUT/dp1_tests_h200.log" | tail -5
    timeout 240 python -m benchmarks.bench_placement --ranks 2 --backend engines --ranks-per-gpu 2 \
      --engine-requests ${DP_REQUESTS:-512} --engine-warmup ${DP_WARMUP:-256} --concurrency ${DP_CONCURRENCY:-64} \
      --max-extra-streams 32 --data "$DATA" --out "$OUT/placement_h200_1gpu.json" > "$OUT/placement.log" 2>&1; prc=$?
    grep '^{' "$OUT/placement.log" | tail -5 | cut -c1-600
    rc=0
    for n in 1 2; do
      python -m benchmarks.bench_cloud_load --device h200_1gpu_dp$n --device-cores 0-3 --cloud-cores 4-15 \
        --gpu-memory-utilization 0.85 --levels 256 --cloud-k 4 \
        --cloud-args "--data-parallel-size $n --data-parallel-backend engines --ranks-per-gpu $n" \
        --questions "$DATA/nq_open/NQ-open.dev.jsonl" --passages "$DATA/wiki_passages_sample/flashrag_wiki18_sample_1000.jsonl" \
        --out "$OUT/cloud_load_h200_1gpu_dp$n.json" > "$OUT/load_dp$n.log" 2>&1 || rc=$?
      grep '^{' "$OUT/load_dp$n.log" | tail -3 | cut -c1-600
    done
    exit $(( trc ? trc : (prc ? prc : rc) )) ;;
  iterative)
    shift
    # issue 16 on its testbed: RaLMSpec vs plain iterative retrieval with the cloud's own decoding
    # (vLLM gangs, prefix cache) on the GPU and the exact index (faiss-cpu flat, PAD SYNTHETIC
    # vectors) on CPU cores, so the verification beside the decoding takes nothing from it (on the
    # 2-core CI box it did: README "Iterative retrieval"). Carry .gpu/faiss (pip install --no-deps
    # --target /tmp/site) and the QA data (nq_open_passages/ + wiki_passages_sample/) as --data.
    # 2026-12-02 (results/iterative_h200_vllm*.json): at 4M pads (a 190 ms search) 1.5-1.6x at every 4;
    # a boundary there costs 4 decoded tokens + a gang reopen (~70 ms), so the search must be several
    # times that for 2x: the next run is 10M (the TeleRAG size, ~475 ms; ~10 s a question, so
    # --budget-s cuts it at what one call answers; run every 4 and every 8 in two calls: EVERY=8).
    # --max-depth 32: the whole answer may run ahead of its verifications (16 held it at 4M)
    taskset -c 2-15 python -m benchmarks.bench_iterative --engine vllm --pad ${PAD:-10000000} \
      --faiss-threads ${FAISS_THREADS:-8} --questions ${QUESTIONS:-50} --every ${EVERY:-4} --max-depth 32 \
      --budget-s ${BUDGET_S:-470} --quiet --out "$OUT/iterative_h200_vllm.json" "$@" > "$OUT/iterative.log" 2>&1; rc=$?
    tail -40 "$OUT/iterative.log" | cut -c1-600; exit $rc ;;
  *) echo "usage: $0 tests|streams|rollback|streams17|load|profile|latency|qa|ttft|retrieval|dp|dp1|iterative"; exit 2 ;;
esac
