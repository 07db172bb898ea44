"""The DevFT ServerApp: builds the devft server from the run config and runs DevftStrategy.

At the end (and, with what there is, when the run fails) it writes into the run config's
`out-dir`: `adapter.safetensors` (the full model's adapter), `ledger.json`, `metrics.json`,
`settings.json` (devft's settings with defaults filled in: `devft_py.run_in_process` of them
is the same run without Flower) and `flower.json` (which SuperNode served which partition,
the memory budgets the SuperNodes declared, and each round's failed partitions with reasons).
"""

from __future__ import annotations

import json
import os
from logging import ERROR, INFO
from pathlib import Path

import devft_py
from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from devft_flower.settings import AppConfig
from devft_flower.strategy import DevftStrategy

app = ServerApp()


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_outputs(out_dir: Path, strategy: DevftStrategy, finished: bool) -> None:
    """Writes what the run produced into `out_dir`."""
    server = strategy.server
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(out_dir / "ledger.json", server.ledger_json())
    _write(out_dir / "metrics.json", server.metrics_json())
    config = strategy.config
    flower = {
        "finished": finished,
        "app": {
            "fault": ",".join(config.faults),
            "fault-partition": config.fault_partition,
            "round-timeout": config.round_timeout,
            "eval-every": config.eval_every,
        },
        "partitions": {str(p): nodes for p, nodes in strategy.directory.partitions().items()},
        "memory-budgets": {str(p): budget for p, budget in sorted(strategy.directory.budgets.items())},
        "rounds": strategy.history,
    }
    _write(out_dir / "flower.json", json.dumps(flower, indent=2))
    server.save_adapter(str(out_dir / "adapter.safetensors"))


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Runs the devft server's plan over the connected SuperNodes."""
    config = AppConfig.from_run_config(context.run_config)
    out_dir = Path(config.out_dir).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    server = devft_py.Server(config.devft)
    settings = json.loads(server.settings_json())
    _write(out_dir / "settings.json", json.dumps(settings, indent=2, sort_keys=True))
    strategy = DevftStrategy(server, config)
    try:
        strategy.start(grid)
    except BaseException:
        log(ERROR, "[devft] the run stopped early; writing what it has to %s", out_dir)
        try:
            write_outputs(out_dir, strategy, finished=False)
        except Exception as exc:  # pylint: disable=broad-except
            log(ERROR, "[devft] could not write the outputs: %r", exc)
        raise
    write_outputs(out_dir, strategy, finished=server.is_finished())
    log(INFO, "[devft] run finished; adapter, ledger and metrics in %s", out_dir)
