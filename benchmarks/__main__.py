"""``make bench``: run the CPU benchmarks one after another; results land in benchmarks/results/.

Each benchmark is also runnable on its own (``python -m benchmarks.<name> --help``). Absolute
times on this 2-core CPU are not the point; ratios measured side by side in one run are. GPU
numbers come from ``benchmarks/gpu_run.sh`` on the lent H100 (see README).
"""

import importlib
import sys

BENCHMARKS = ["bench_scheduling_sim", "bench_llamacpp_streams", "bench_vllm_streams", "bench_e2e",
              "bench_baselines", "bench_edge_serve", "bench_quality_lm", "bench_quality_qa", "bench_padding"]

if __name__ == "__main__":
    chosen = sys.argv[1:] or BENCHMARKS
    for name in chosen:
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            print(f"== {name}: not available ({exc})")
            continue
        print(f"== {name}")
        mod.main([])
