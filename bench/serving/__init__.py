"""Pieces of bench/serving_bench.py: the host-DRAM budget, SGLang's bench_serving client, the agent client, the CPU
neighbour and the report."""
