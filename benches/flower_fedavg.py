"""Flower (flwr) FedAvg reference benchmark: aggregation of LoRA updates, Llama-7B shape.

Builds, per client, the LoRA adapter arrays of a Llama-7B-shaped model (32 layers; per
layer q,k,v,o,gate,up,down with (d_in, d_out) = 4096x4096 for q/k/v/o, 4096x11008 for
gate/up, 11008x4096 for down; rank r=32; lora_A [r, d_in] then lora_B [d_out, r]):
448 float32 arrays, 79,953,920 values per client. Client c has num_examples = 100 + c.

Values (identical to the Rust benchmark; not timed): client c, array k (0-based, order
above), flat element i: float32(((i*2654435761 + k*40503 + c*97) mod 1000003) / 1000003.0
- 0.5), integer part in uint64, division and subtraction in float64, then cast.

Timed (warm-up once, then --repeats runs, time.perf_counter, median reported):
  * flwr.server.strategy.aggregate.aggregate(results), results = [(arrays_c, n_c), ...]
    -- what FedAvg uses with inplace=False. This is the number to compare with Rust.
  * aggregate_inplace([(None, FitRes), ...]) (FedAvg's default, inplace=True).
    It deserialises every client's Parameters (np.load from bytes) inside the call,
    so its time includes that; deserialisation alone (streamed) is timed too.
    Skip with --no-inplace.
Checksums: float64 sum of the first 10 values of the aggregated first and last array.

Run:  python benches/flower_fedavg.py [--clients 20] [--repeats 3] [--no-inplace]
One JSON object on stdout, progress on stderr. Needs ~14 GB RAM for 20 clients.
"""
import argparse, json, resource, statistics, sys, time

import numpy as np
import flwr
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy.aggregate import aggregate, aggregate_inplace

LAYERS, RANK, P, M = 32, 32, 1000003, 2654435761
PROJ = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096),
        ("o_proj", 4096, 4096), ("gate_proj", 4096, 11008), ("up_proj", 4096, 11008),
        ("down_proj", 11008, 4096)]
SHAPES = [s for _ in range(LAYERS) for _, di, do in PROJ for s in ((RANK, di), (do, RANK))]


def log(*a):
    print(*a, file=sys.stderr, flush=True)

def make_client(c, base):
    out = []
    for k, shape in enumerate(SHAPES):
        n = shape[0] * shape[1]
        # (i*M + off) mod P == ((i*M mod P) + off) mod P; i*M < 2^64 for i < 2^32.
        ints = (base[n] + np.uint64(k * 40503 + c * 97)) % np.uint64(P)
        out.append((ints / float(P) - 0.5).astype(np.float32).reshape(shape))
    return out

def bench(fn, repeats):
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        t = time.perf_counter(); res = fn(); runs.append(time.perf_counter() - t)
        del res
    return runs

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-inplace", action="store_true")
    args = ap.parse_args()

    per_client = sum(a * b for a, b in SHAPES)
    assert len(SHAPES) == 448 and per_client == 79_953_920, (len(SHAPES), per_client)
    base = {n: (np.arange(n, dtype=np.uint64) * np.uint64(M)) % np.uint64(P)
            for n in {a * b for a, b in SHAPES}}
    t = time.perf_counter()
    results = [(make_client(c, base), 100 + c) for c in range(args.clients)]
    log(f"generated {args.clients} clients x {per_client} values in {time.perf_counter() - t:.1f}s")

    agg = aggregate(results)
    ck = lambda a: float(a.ravel()[:10].astype(np.float64).sum())
    ck_first, ck_last = ck(agg[0]), ck(agg[-1])
    assert agg[0].dtype == np.float32, agg[0].dtype
    del agg
    runs = bench(lambda: aggregate(results), args.repeats)
    log(f"aggregate: {runs}")
    out = {"flwr": flwr.__version__, "numpy": np.__version__, "clients": args.clients,
           "values_per_client": per_client, "aggregate_median_s": statistics.median(runs),
           "aggregate_runs_s": runs, "checksum_first": ck_first, "checksum_last": ck_last}

    if not args.no_inplace:
        fit = []
        for c in range(args.clients):  # serialise, freeing the raw arrays as we go
            arrays, n = results[c]
            results[c] = None
            fit.append((None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {})))
            del arrays
        del results
        agg = aggregate_inplace(fit)
        out["checksum_first_inplace"], out["checksum_last_inplace"] = ck(agg[0]), ck(agg[-1])
        del agg
        runs = bench(lambda: aggregate_inplace(fit), args.repeats)
        out["aggregate_inplace_median_s"], out["aggregate_inplace_runs_s"] = statistics.median(runs), runs
        def deser():  # one client at a time, like aggregate_inplace (not all held at once)
            for _, f in fit:
                parameters_to_ndarrays(f.parameters)
        runs = bench(deser, args.repeats)
        out["deserialize_only_median_s"] = statistics.median(runs)
        log(f"aggregate_inplace: {out['aggregate_inplace_runs_s']}, deserialize: {runs}")

    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
