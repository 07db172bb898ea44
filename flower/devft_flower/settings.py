"""The run config split into devft's settings and the app's own keys, and the byte carriers.

Everything in the run config goes to `devft_py` as it is (devft ignores keys it does not
read); the keys below are also read by the app itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

# The record keys of the messages.
RECORD = "devft"  # ArrayRecord: "setup" (optional) and "task" down, "reply" up
CONFIG = "config"  # ConfigRecord down: "round", "partition", "max-reply-bytes"
ERROR = "error"  # ConfigRecord up, instead of "reply": {"reason": str}

# Faults a ClientApp can inject into its own replies (for testing the server's checks).
FAULT_KINDS = (
    "none",  # an honest reply
    "garbage",  # random bytes of the reply's length
    "truncated",  # the reply cut in half
    "oversized",  # the reply padded one byte past the server's bound
    "nan",  # the reply with its first float32 tensor value set to NaN
    "wrong-key",  # the bytes under another key than "reply"
    "devft-error",  # a devft error reported as such (no training)
    "raise",  # the ClientApp raises: Flower replies with an error message
)


def _float(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run config `{key}` = {value!r} is not a number") from exc


def _int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run config `{key}` = {value!r} is not an integer") from exc


@dataclass
class AppConfig:
    """The app's view of the run config."""

    devft: dict[str, Any]
    out_dir: str = "devft-flower-out"
    round_timeout: float = 3600.0
    poll_interval: float = 0.5
    eval_every: int = 1
    min_nodes: int = 0
    node_wait: float = 120.0
    faults: list[str] = field(default_factory=lambda: ["none"])
    fault_partition: int = 1

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "AppConfig":
        """Reads the app's keys; `devft` holds the whole run config, for devft_py."""
        config = dict(run_config)
        faults = parse_faults(str(config.get("fault", "none")))
        app = cls(
            devft=config,
            out_dir=str(config.get("out-dir", "devft-flower-out")),
            round_timeout=_float(config, "round-timeout", 3600.0),
            poll_interval=_float(config, "poll-interval", 0.5),
            eval_every=_int(config, "eval-every", 1),
            min_nodes=_int(config, "min-nodes", 0),
            node_wait=_float(config, "node-wait", 120.0),
            faults=faults,
            fault_partition=_int(config, "fault-partition", 1),
        )
        if app.round_timeout <= 0 or app.poll_interval <= 0:
            raise ValueError("run config `round-timeout` and `poll-interval` must be positive")
        return app

    def num_partitions(self) -> int:
        """The run's number of partitions (devft's `num-partitions`)."""
        return _int(self.devft, "num-partitions", 0)

    def fault_for(self, partition: int, server_round: int) -> str:
        """The fault `partition` injects in `server_round` (1-based)."""
        if partition != self.fault_partition or not self.faults:
            return "none"
        return self.faults[(server_round - 1) % len(self.faults)]


def parse_faults(spec: str) -> list[str]:
    """`"garbage,nan"` -> `["garbage", "nan"]`, checked against FAULT_KINDS."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()] or ["none"]
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown:
        raise ValueError(
            f"run config `fault` has unknown kinds {unknown}; known: {', '.join(FAULT_KINDS)}"
        )
    return kinds


def to_array(data: bytes) -> Array:
    """Opaque bytes as a Flower Array (a 1-D uint8 ndarray; round-trips exactly)."""
    return Array(np.frombuffer(data, dtype=np.uint8))


def from_array(array: Array) -> bytes:
    """The bytes carried by `to_array`."""
    values = array.numpy()
    if values.dtype != np.uint8 or values.ndim != 1:
        raise ValueError(f"expected a 1-D uint8 array, got {values.dtype} {values.shape}")
    return values.tobytes()


def bytes_of(record: ArrayRecord, key: str) -> bytes | None:
    """The bytes under `key` in `record`, or None when absent."""
    if key not in record:
        return None
    return from_array(record[key])
