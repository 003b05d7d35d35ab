"""`quantkit bench`: the receipts. `run.py` drives offline (every way of serving one workload, side
by side) and online (a request-rate sweep against OpenAI-compatible servers, best throughput under a
p95 SLO) runs, with KV waste, memory and cost; the other modules are their parts."""
