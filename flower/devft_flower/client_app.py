"""The DevFT ClientApp: trains the devft client of this SuperNode's partition.

Flower 1.42 runs every message in a fresh `flwr-clientapp` process (both `--isolation
subprocess` and `process`), so a `devft_py.Client` cannot stay in memory between rounds; the
per-process cache below only helps runtimes that reuse the process. What does persist per node
and run is `context.state`: after each task the ClientApp stores `client.state()` there (the
stage's set-up, the merges applied, the client's kept tensors such as FedSA-LoRA's B) and the
next process restarts from it with `devft_py.Client(settings, partition, state)`. That state
stays on the node; it is not network traffic.
"""

from __future__ import annotations

from logging import ERROR as LOG_ERROR
from logging import WARNING

import devft_py
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import log

from devft_flower import faults
from devft_flower.settings import CONFIG, ERROR, RECORD, AppConfig, bytes_of, to_array

app = ClientApp()

STATE = "devft-client"  # context.state ArrayRecord: "state", the client's last state()
_CLIENTS: dict[tuple, "devft_py.Client"] = {}  # (run id, partition) -> client, per process


def partition_of(context: Context) -> int:
    """This SuperNode's partition (`--node-config partition-id=N`)."""
    if "partition-id" not in context.node_config:
        raise devft_py.InvalidArgumentError(
            "this SuperNode has no `partition-id` in its --node-config"
        )
    return int(context.node_config["partition-id"])


def _error_reply(msg: Message, reason: str) -> Message:
    return Message(RecordDict({ERROR: ConfigRecord({"reason": reason})}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answers the server's discovery: which partition this node holds and the training memory
    it declares (`--node-config memory-budget="640M"`; empty: no limit)."""
    content = ConfigRecord({"partition-id": -1, "num-partitions": -1, "memory-budget": ""})
    if "partition-id" in context.node_config:
        content["partition-id"] = int(context.node_config["partition-id"])
    if "num-partitions" in context.node_config:
        content["num-partitions"] = int(context.node_config["num-partitions"])
    if "memory-budget" in context.node_config:
        content["memory-budget"] = str(context.node_config["memory-budget"])
    return Message(RecordDict({"node": content}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Trains on the task (and set-up) of the message; replies `ArrayRecord({"reply": ...})`."""
    config = AppConfig.from_run_config(context.run_config)
    meta = msg.content[CONFIG] if CONFIG in msg.content else ConfigRecord()
    server_round = int(meta.get("round", 0))
    max_reply_bytes = int(meta.get("max-reply-bytes", 0))
    try:
        partition = partition_of(context)
        fault = config.fault_for(partition, server_round)
        if fault == "raise":
            raise RuntimeError(f"fault injection: partition {partition} raises in round {server_round}")
        if fault == "devft-error":
            return _error_reply(msg, f"fault injection: partition {partition} reports an error")
        record = msg.content[RECORD]
        task = bytes_of(record, "task")
        if task is None:
            raise devft_py.InvalidMessageError("the message carries no `task`")
        setup = bytes_of(record, "setup")
        client = _CLIENTS.get((context.run_id, partition))
        if client is None:
            # A fresh process: restart from the state the last one left on this node.
            saved = bytes_of(context.state[STATE], "state") if STATE in context.state else None
            client = devft_py.Client(config.devft, partition, saved)
            _CLIENTS.clear()
            _CLIENTS[(context.run_id, partition)] = client
        reply = client.train(setup, task)
        state = client.state()
        if state is not None:
            context.state[STATE] = ArrayRecord({"state": to_array(state)})
    except devft_py.DevftError as exc:
        log(LOG_ERROR, "[devft] round %s: devft error: %s", server_round, exc)
        return _error_reply(msg, f"{type(exc).__name__}: {exc}")

    if fault in ("garbage", "truncated", "oversized", "nan"):
        reply = faults.corrupt(fault, reply, max_reply_bytes, seed=server_round)
        log(WARNING, "[devft] round %s: fault injection: %s reply (%d bytes)", server_round, fault, len(reply))
    key = "reply" if fault != "wrong-key" else "not-the-reply"
    return Message(RecordDict({RECORD: ArrayRecord({key: to_array(reply)})}), reply_to=msg)
