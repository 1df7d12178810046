"""The lab: studies and the GPU-lease run, beside the load tool of `benchmarks/`.

Each module answers one question about microbatch itself (the server's own overhead on a
null model, the engine process's CPU per item, torch threads on a small machine, holding
a p99 target, fidelity to the reference library, a before/after of two commits), or runs
a short lease on a GPU machine (`gpu.sh`, with `gpu_bundle` for a machine without a
package index and `gpu_report` for its report). The lab uses the load tool; neither the
server nor the load tool (`microbatch bench/sweep/plot/soak`) imports the lab
(tests/benchmarks/test_rooms.py holds that).
"""
