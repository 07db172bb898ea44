"""DevftStrategy: a Flower Strategy whose decisions are devft's (`devft_py.Server`).

The devft server picks the round's clients (partition ids, seeded sampling), writes every
client's task (and the stage set-up for clients new to the stage), takes the replies and
evaluates centrally. This strategy maps partition ids to the SuperNodes holding them
(`NodeDirectory`, a `query` message to each node, which also brings the memory budget a node
declares in its node config: the devft server then leaves it out of stages whose memory
estimate exceeds it), carries the opaque bytes as uint8 Arrays
and turns everything that can go wrong on the way (no node for a partition, a node that left,
no reply in time, a Flower error reply, a reply without bytes, a ClientApp's devft error) into
a failed client with a reason, so that nothing a client does stops the ServerApp.

`start` runs the rounds until the devft server is finished (its plan decides their number),
with its own send-and-receive that polls replies every `poll-interval` seconds (Flower's
`Grid.send_and_receive` sleeps 3 s between polls).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from typing import Any

import devft_py
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from devft_flower.settings import CONFIG, ERROR as ERROR_KEY, RECORD, AppConfig, bytes_of, to_array


def _node_reason(reply: Message) -> str:
    error = reply.error
    return f"Flower error {error.code}: {error.reason}"


@dataclass
class NodeDirectory:
    """Which SuperNode holds which partition and what memory it declared, learnt by asking each
    node (`query` message)."""

    poll_interval: float = 0.5
    by_node: dict[int, int] = field(default_factory=dict)  # node id -> partition id
    alive: set[int] = field(default_factory=set)
    budgets: dict[int, str] = field(default_factory=dict)  # partition id -> declared budget

    def wait_for(self, grid: Grid, count: int, seconds: float) -> None:
        """Waits until `count` nodes are connected, at most `seconds`."""
        deadline = time.monotonic() + seconds
        while True:
            nodes = set(grid.get_node_ids())
            if len(nodes) >= count or time.monotonic() >= deadline:
                break
            time.sleep(self.poll_interval)
        log(INFO, "[devft] %d SuperNode(s) connected (waited for %d)", len(nodes), count)

    def refresh(
        self, grid: Grid, timeout: float, declare: Callable[[int, int | None], None]
    ) -> None:
        """Learns the nodes connected now; asks the new ones for their partition and memory
        budget, and passes each declared budget (bytes, `None` for no limit) to `declare`. A node
        whose budget does not parse is not used (its partition stays without a node)."""
        self.alive = set(grid.get_node_ids())
        new = sorted(self.alive - set(self.by_node))
        if not new:
            return
        queries = [
            Message(RecordDict({"query": ConfigRecord({"what": "partition-id"})}), dst_node_id=n, message_type="query")
            for n in new
        ]
        replies, _, _ = exchange(grid, queries, timeout, self.poll_interval)
        for node, msg in zip(new, queries):
            reply = replies.get(msg.metadata.message_id)
            if reply is None or reply.has_error() or "node" not in reply.content:
                why = "no answer" if reply is None else (
                    _node_reason(reply) if reply.has_error() else "an answer without `node`"
                )
                log(WARNING, "[devft] SuperNode %s did not tell its partition (%s)", node, why)
                continue
            partition = int(reply.content["node"]["partition-id"])
            if partition < 0:
                log(WARNING, "[devft] SuperNode %s has no partition-id in its node config", node)
                continue
            budget = str(reply.content["node"].get("memory-budget", "")).strip()
            if budget:
                try:
                    declare(partition, devft_py.parse_memory_budget(budget))
                except devft_py.DevftError as exc:
                    log(WARNING, "[devft] SuperNode %s is not used: its memory budget %r: %s", node, budget, exc)
                    continue
                self.budgets[partition] = budget
            self.by_node[node] = partition
            log(INFO, "[devft] SuperNode %s holds partition %d%s", node, partition,
                f", memory budget {budget}" if budget else "")

    def node_of(self, partition: int) -> int | None:
        """A connected node holding `partition` (the lowest id when several claim it)."""
        nodes = sorted(n for n, p in self.by_node.items() if p == partition and n in self.alive)
        return nodes[0] if nodes else None

    def partitions(self) -> dict[int, list[int]]:
        """Partition id -> the known nodes claiming it."""
        out: dict[int, list[int]] = {}
        for node, partition in sorted(self.by_node.items()):
            out.setdefault(partition, []).append(node)
        return out


def exchange(
    grid: Grid, messages: list[Message], timeout: float, poll_interval: float
) -> tuple[dict[str, Message], list[Message], list[Message]]:
    """Pushes `messages` and pulls their replies until all came or `timeout` passed.

    Returns the replies by the id of the message they answer, the messages the SuperLink
    refused (unknown or unregistered destination) and those left without a reply.
    """
    if not messages:
        return {}, [], []
    ids = list(grid.push_messages(messages))
    waiting: dict[str, Message] = {}
    undelivered: list[Message] = []
    for msg, msg_id in zip(messages, ids):
        if msg_id:
            waiting[msg_id] = msg
        else:
            undelivered.append(msg)
    replies: dict[str, Message] = {}
    deadline = time.monotonic() + timeout
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            answered = reply.metadata.reply_to_message_id
            if answered in waiting:
                replies[answered] = reply
                del waiting[answered]
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_interval)
    return replies, undelivered, list(waiting.values())


@dataclass
class _Round:
    number: int
    stage: int
    capacity: int
    tasks: list[dict[str, Any]]
    messages: dict[int, Message] = field(default_factory=dict)  # partition -> message sent
    failures: dict[int, str] = field(default_factory=dict)  # partition -> reason (before replies)
    started: float = field(default_factory=time.monotonic)


class DevftStrategy(Strategy):
    """Runs a devft `Server` over a Flower Grid."""

    def __init__(self, server: "devft_py.Server", config: AppConfig) -> None:
        self.server = server
        self.config = config
        self.directory = NodeDirectory(poll_interval=config.poll_interval)
        self.settings: dict[str, Any] = json.loads(server.settings_json())
        self.total_rounds = int(self.settings.get("rounds", 0))
        self.history: list[dict[str, Any]] = []  # per round: nodes, failures, seconds
        self._round: _Round | None = None

    # --- Strategy API ------------------------------------------------------------------

    def summary(self) -> None:
        log(INFO, "\t├── devft server: %d rounds, schedule %s, aggregator %s, %s partitions",
            self.total_rounds, self.settings.get("schedule"), self.settings.get("aggregator"),
            self.settings.get("num-partitions"))
        log(INFO, "\t├── round timeout %.0f s, poll interval %.2f s, central evaluation every %d round(s)",
            self.config.round_timeout, self.config.poll_interval, self.config.eval_every)
        if self.config.faults != ["none"]:
            log(WARNING, "\t└── fault injection: partition %d sends %s",
                self.config.fault_partition, ",".join(self.config.faults))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The devft server's tasks for `server_round`, one message per sampled partition."""
        plan = self.server.configure_round()
        if int(plan["round"]) != server_round:
            log(WARNING, "[devft] Flower round %d is devft round %s", server_round, plan["round"])
        current = _Round(int(plan["round"]), int(plan["stage"]), int(plan["capacity"]), list(plan["tasks"]))
        self._round = current
        messages = []
        for task in current.tasks:
            partition = int(task["client"])
            node = self.directory.node_of(partition)
            if node is None:
                current.failures[partition] = f"no connected SuperNode holds partition {partition}"
                continue
            record = ArrayRecord({"task": to_array(task["task"])})
            if task["setup"] is not None:
                record["setup"] = to_array(task["setup"])
            meta = ConfigRecord({
                "round": current.number,
                "stage": current.stage,
                "partition": partition,
                "max-reply-bytes": int(task["max_reply_bytes"]),
            })
            msg = Message(
                RecordDict({RECORD: record, CONFIG: meta}),
                dst_node_id=node,
                message_type="train",
                group_id=str(current.number),
            )
            current.messages[partition] = msg
            messages.append(msg)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hands every sampled partition's reply (or why it has none) to the devft server."""
        current = self._round
        if current is None:
            raise RuntimeError("aggregate_train before configure_train")
        by_message = {m.metadata.message_id: p for p, m in current.messages.items()}
        by_node = {m.metadata.dst_node_id: p for p, m in current.messages.items()}
        got: dict[int, Message] = {}
        for reply in replies:
            partition = by_message.get(reply.metadata.reply_to_message_id)
            if partition is None and not reply.has_error():
                partition = by_node.get(reply.metadata.src_node_id)
            if partition is None:
                log(WARNING, "[devft] round %d: a reply to no message of this round, ignored", current.number)
                continue
            got[partition] = reply
        answers = []
        for task in current.tasks:
            partition = int(task["client"])
            reply_bytes, reason = None, current.failures.get(partition)
            if reason is None:
                reply = got.get(partition)
                if reply is None:
                    reason = f"no reply within {self.config.round_timeout:g} s"
                else:
                    reply_bytes, reason = self._reply_bytes(reply)
            if reason is not None:
                log(WARNING, "[devft] round %d: partition %d failed: %s", current.number, partition, reason)
            answers.append((partition, reply_bytes, reason))
        metrics = json.loads(self.server.aggregate_round(answers))
        for partition, reason in metrics.get("clients_failed", []):
            if any(p == partition and data is not None for p, data, _ in answers):
                log(WARNING, "[devft] round %d: partition %d's reply refused: %s", current.number, partition, reason)
            current.failures[int(partition)] = reason
        record = MetricRecord({
            "clients-sampled": len(metrics.get("clients_sampled", [])),
            "clients-failed": len(metrics.get("clients_failed", [])),
            "aggregated": int(bool(metrics.get("aggregated"))),
        })
        if metrics.get("train_loss") is not None:
            record["train-loss"] = float(metrics["train_loss"])
        return None, record

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """None: devft evaluates centrally, on the server's held-out split."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Closes the round on the devft server (with its central evaluation when due)."""
        current = self._round
        if current is None:
            raise RuntimeError("aggregate_evaluate before configure_train")
        last = current.number >= self.total_rounds
        every = self.config.eval_every
        evaluate = last or (every > 0 and current.number % every == 0)
        metrics = json.loads(self.server.finish_round(evaluate))
        seconds = time.monotonic() - current.started
        self.history.append({
            "round": current.number,
            "stage": current.stage,
            "capacity": current.capacity,
            "nodes": {str(p): m.metadata.dst_node_id for p, m in current.messages.items()},
            "failed": {str(p): r for p, r in sorted(current.failures.items())},
            "seconds": seconds,
        })
        self._round = None
        log(INFO, "[devft] round %d finished: stage %d, capacity %d, %d/%d clients ok, eval loss %s, %.2f s",
            current.number, current.stage, current.capacity,
            len(current.tasks) - len(current.failures), len(current.tasks),
            metrics.get("eval_loss"), seconds)
        if metrics.get("eval_loss") is None:
            return None
        return MetricRecord({"eval-loss": float(metrics["eval_loss"])})

    # --- the loop ----------------------------------------------------------------------

    def start(  # pylint: disable=too-many-arguments
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Runs rounds until the devft server is finished (or `num_rounds`, if given)."""
        timeout = self.config.round_timeout if timeout is None else timeout
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        arrays = ArrayRecord() if initial_arrays is None else initial_arrays
        log(INFO, "Starting %s strategy:", type(self).__name__)
        self.summary()
        expected = self.config.min_nodes or int(self.settings.get("num-partitions", 0))
        self.directory.wait_for(grid, expected, self.config.node_wait)
        result = Result()
        started = time.monotonic()
        server_round = 0
        while not self.server.is_finished() and (num_rounds is None or server_round < num_rounds):
            server_round += 1
            log(INFO, "")
            log(INFO, "[ROUND %d/%d]", server_round, self.total_rounds)
            self.directory.refresh(grid, min(timeout, self.config.node_wait), self.server.declare_memory_budget)
            messages = list(self.configure_train(server_round, arrays, train_config, grid))
            replies, undelivered, late = exchange(grid, messages, timeout, self.config.poll_interval)
            current = self._round
            assert current is not None
            refused = {id(m) for m in undelivered}
            for partition, msg in current.messages.items():
                if id(msg) in refused:
                    current.failures[partition] = (
                        f"the SuperLink refused the message to SuperNode {msg.metadata.dst_node_id} (gone)"
                    )
            _, train_metrics = self.aggregate_train(server_round, replies.values())
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            evaluate_messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
            eval_replies, _, _ = exchange(grid, evaluate_messages, timeout, self.config.poll_interval)
            eval_metrics = self.aggregate_evaluate(server_round, eval_replies.values())
            if eval_metrics is not None:
                result.evaluate_metrics_serverapp[server_round] = eval_metrics
        result.arrays = ArrayRecord({k: Array(v) for k, v in self.server.adapter().items()})
        log(INFO, "[devft] %d rounds in %.2f s", server_round, time.monotonic() - started)
        return result

    # --- helpers -----------------------------------------------------------------------

    @staticmethod
    def _reply_bytes(reply: Message) -> tuple[bytes | None, str | None]:
        """The reply's bytes, or why there are none."""
        try:
            if reply.has_error():
                return None, _node_reason(reply)
            content = reply.content
            if ERROR_KEY in content:
                return None, f"the client reported: {content[ERROR_KEY].get('reason', '(no reason)')}"
            if RECORD not in content:
                return None, f"the reply has no `{RECORD}` record"
            data = bytes_of(content[RECORD], "reply")
            if data is None:
                return None, f"the reply's `{RECORD}` record has no `reply` (keys: {sorted(content[RECORD])})"
            return data, None
        except Exception as exc:  # pylint: disable=broad-except
            log(ERROR, "[devft] unreadable reply: %r", exc)
            return None, f"unreadable reply: {type(exc).__name__}: {exc}"
