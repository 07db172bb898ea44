#!/usr/bin/env python3
"""Checks a Flower run of devft (scripts/run_flower.sh) against the same run in one process.

    flower_check.py OUT                          the run equals devft_py.run_in_process of its
                                                 settings: every adapter tensor within 1e-6
                                                 (max abs diff), the ledger entry by entry
                                                 (bytes exactly, but for a reply's header, which
                                                 carries the client's measured peak memory),
                                                 the same sampled and excluded clients, no
                                                 failed client; budgets the SuperNodes declared
                                                 (flower.json "memory-budgets") go into the
                                                 in-process run's `client-memory`
    flower_check.py OUT --expect-excluded P      also: partition P declared a memory budget, was
                                                 sampled in some round and left out of a later
                                                 one for its memory budget
    flower_check.py OUT --expect-failure-of P [--after-round K]
                                                 the run finished; partition P failed (with a
                                                 reason) in a round after K, no one failed up to
                                                 round K, no other partition failed
    flower_check.py OUT --expect-faults          the run finished; in every round whose injected
                                                 fault (flower.json "app") is not `none`, the
                                                 faulty partition is a failed client with a
                                                 reason, and no other partition failed

Run it with the Python that has devft_py (target/flower-venv/bin/python). Exit status 0 when
every check holds, 1 otherwise (each failed check is printed).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import numpy as np

FAILURES: list[str] = []


def check(ok: bool, what: str) -> bool:
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        FAILURES.append(what)
    return ok


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """A safetensors file's float32 tensors (no dependency on the safetensors package)."""
    data = path.read_bytes()
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(data[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{name}: dtype {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        raw = data[8 + n + begin : 8 + n + end]
        out[name] = np.frombuffer(raw, dtype="<f4").reshape(info["shape"])
    return out


def load_run(out: Path) -> dict:
    run = {name: json.loads((out / f"{name}.json").read_text()) for name in ("settings", "ledger", "metrics", "flower")}
    run["adapter"] = load_safetensors(out / "adapter.safetensors")
    return run


def failed_by_round(metrics: list[dict]) -> dict[int, dict[int, str]]:
    return {int(m["round"]): {int(c): str(r) for c, r in m.get("clients_failed", [])} for m in metrics}


def same_traffic(a: dict, b: dict) -> bool:
    """Two ledger entries are equal but for the whole size of the reply, whose header carries
    the client's measured peak memory: that may differ by the digits of the number."""
    def without_reply_total(entry: dict) -> dict:
        return {**entry, "up": {**entry["up"], "total": None}}
    return without_reply_total(a) == without_reply_total(b) and abs(a["up"]["total"] - b["up"]["total"]) <= 24


def ledger_entries(ledger) -> list:
    return ledger["entries"] if isinstance(ledger, dict) and "entries" in ledger else ledger


def check_finished(run: dict) -> None:
    rounds = int(run["settings"]["rounds"])
    check(bool(run["flower"].get("finished")), "the ServerApp says the run finished")
    check(len(run["metrics"]) == rounds, f"metrics of all {rounds} rounds ({len(run['metrics'])})")


def reference_settings(run: dict) -> dict:
    """The run's settings, with the budgets its SuperNodes declared as `client-memory`."""
    settings = dict(run["settings"])
    declared = run["flower"].get("memory-budgets", {})
    if declared:
        clients = int(settings["num-partitions"])
        listed = [b.strip() for b in str(settings.get("client-memory", "")).split(",") if b.strip()]
        budgets = listed * clients if len(listed) == 1 else listed or ["none"] * clients
        for partition, budget in declared.items():
            budgets[int(partition)] = budget
        settings["client-memory"] = ",".join(budgets)
    return settings


def check_parity(run: dict, tolerance: float) -> None:
    import devft_py  # pylint: disable=import-outside-toplevel

    check_finished(run)
    reference = devft_py.run_in_process(reference_settings(run))
    ours, theirs = run["adapter"], reference["adapter"]
    check(sorted(ours) == sorted(theirs), f"the same {len(theirs)} adapter tensors")
    worst, worst_name = 0.0, ""
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], np.asarray(theirs[name], dtype=np.float32)
        if a.shape != b.shape:
            check(False, f"{name}: shape {a.shape}, in-process {b.shape}")
            continue
        diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
        if not np.isfinite(diff) or diff > worst:
            worst, worst_name = diff, name
    check(worst <= tolerance, f"adapter max abs diff {worst:.3e} <= {tolerance:g} (worst: {worst_name or '-'})")
    flower_ledger = ledger_entries(run["ledger"])
    reference_ledger = ledger_entries(json.loads(reference["ledger"]))
    check(len(flower_ledger) == len(reference_ledger),
          f"ledger: {len(flower_ledger)} entries, in-process {len(reference_ledger)}")
    for i, (a, b) in enumerate(zip(flower_ledger, reference_ledger)):
        if not same_traffic(a, b):
            check(False, f"ledger entry {i} differs")
            print(f"      flower:     {json.dumps(a, sort_keys=True)}\n      in-process: {json.dumps(b, sort_keys=True)}")
    check(len(flower_ledger) == len(reference_ledger) and all(map(same_traffic, flower_ledger, reference_ledger)),
          f"ledger: all {len(flower_ledger)} entries equal")
    reference_metrics = json.loads(reference["metrics"])
    for ours_m, theirs_m in zip(run["metrics"], reference_metrics):
        r = ours_m["round"]
        check(ours_m["clients_sampled"] == theirs_m["clients_sampled"], f"round {r}: sampled {ours_m['clients_sampled']}")
        check(ours_m["clients_excluded"] == theirs_m["clients_excluded"],
              f"round {r}: excluded {[c for c, _ in ours_m['clients_excluded']]}")
        check(not ours_m["clients_failed"], f"round {r}: no failed client {ours_m['clients_failed'] or ''}")
        a, b = ours_m.get("train_loss"), theirs_m.get("train_loss")
        if a is not None and b is not None:
            check(abs(a - b) <= 1e-6 * max(1.0, abs(b)), f"round {r}: train loss {a:.6f} (in-process {b:.6f})")


def check_exclusion(run: dict, partition: int) -> None:
    declared = run["flower"].get("memory-budgets", {})
    check(str(partition) in declared, f"partition {partition} declared a memory budget {declared}")
    sampled = [int(m["round"]) for m in run["metrics"] if partition in m["clients_sampled"]]
    excluded = {int(m["round"]): why for m in run["metrics"] for c, why in m["clients_excluded"] if c == partition}
    check(bool(sampled), f"partition {partition} took part in rounds {sampled}")
    check(bool(excluded) and min(excluded) > min(sampled or [0]),
          f"partition {partition} was left out of later rounds {sorted(excluded)}")
    check(all("memory budget" in why for why in excluded.values()), f"for its memory budget: {set(excluded.values())}")


def check_node_failure(run: dict, partition: int, after: int) -> None:
    check_finished(run)
    failed = failed_by_round(run["metrics"])
    for r, clients in sorted(failed.items()):
        if r <= after:
            check(not clients, f"round {r} (before the stop): no failed client {clients or ''}")
        else:
            others = {c: why for c, why in clients.items() if c != partition}
            check(not others, f"round {r}: no partition other than {partition} failed {others or ''}")
    later = {r: clients[partition] for r, clients in failed.items() if r > after and partition in clients}
    check(bool(later), f"partition {partition} failed in some round after {after}: {later}")
    check(all(why.strip() for why in later.values()), "every failure has a reason")
    check(all(m.get("aggregated") for m in run["metrics"]), "every round aggregated (the remaining node)")


def check_faults(run: dict) -> None:
    check_finished(run)
    app = run["flower"]["app"]
    kinds = [k for k in app["fault"].split(",") if k] or ["none"]
    partition = int(app["fault-partition"])
    failed = failed_by_round(run["metrics"])
    sampled = {int(m["round"]): set(m["clients_sampled"]) for m in run["metrics"]}
    injected = 0
    for r in sorted(failed):
        kind = kinds[(r - 1) % len(kinds)]
        clients = failed[r]
        if kind != "none" and partition in sampled[r]:
            injected += 1
            why = clients.get(partition, "")
            check(partition in clients and bool(why.strip()), f"round {r}: `{kind}` from partition {partition} is a failed client: {why}")
        others = {c: w for c, w in clients.items() if c != partition or kind == "none"}
        check(not others, f"round {r}: no other failed client {others or ''}")
    check(injected > 0, f"{injected} malformed replies were injected")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the run's --out directory")
    parser.add_argument("--expect-failure-of", type=int, metavar="PARTITION")
    parser.add_argument("--after-round", type=int, default=0, metavar="K")
    parser.add_argument("--expect-faults", action="store_true")
    parser.add_argument("--expect-excluded", type=int, metavar="PARTITION")
    parser.add_argument("--tolerance", type=float, default=1e-6)
    args = parser.parse_args()
    run = load_run(args.out)
    if args.expect_failure_of is not None:
        check_node_failure(run, args.expect_failure_of, args.after_round)
    elif args.expect_faults:
        check_faults(run)
    else:
        check_parity(run, args.tolerance)
    if args.expect_excluded is not None:
        check_exclusion(run, args.expect_excluded)
    for m in run["metrics"]:
        print(f"      round {m['round']}: stage {m['stage']} capacity {m['capacity']} sampled {m['clients_sampled']} "
              f"excluded {[c for c, _ in m['clients_excluded']]} failed {[c for c, _ in m['clients_failed']]} train_loss {m.get('train_loss')} eval_loss {m.get('eval_loss')}")
    print(f"{len(FAILURES)} check(s) failed" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
