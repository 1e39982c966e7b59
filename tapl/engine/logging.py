"""Logging callbacks: ``metrics.jsonl`` / ``post_federation.jsonl``, and TensorBoard or any Lightning logger."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import yaml
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from tapl.engine.callbacks import Engine, EngineCallback
from tapl.run_dir import POST_FEDERATION_METRICS


class MetricsFile(EngineCallback):
    """Appends each round's record to ``metrics.jsonl`` and each client's post-federation record to
    ``post_federation.jsonl`` (rank 0)."""

    @rank_zero_only
    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        engine.run_dir.append_metrics(record)

    @rank_zero_only
    def on_post_federation_client_end(self, engine: Engine, record: dict[str, Any]) -> None:
        engine.run_dir.append_metrics(record, POST_FEDERATION_METRICS)


class LoggerCallback(EngineCallback):
    """Sends every round's scalars to Lightning loggers (rank 0): TensorBoard in the run directory by default.

    One scalar stream per round for the global and personalized metrics per task, task type and client, the
    training metrics of every visit, the algorithm's scalars and the communication bytes. TensorBoard loggers
    also get one histogram per model, task and metric of its values over clients, and at the end the run's
    settings with its final test metrics (the hparams view).

    Args:
        loggers: The loggers (``--trainer.logger``); ``None``: a TensorBoard logger writing to
            ``RUN_DIR/tensorboard``.
        config_text: The run's resolved configuration (the hparams logged at the end).
        label: The algorithm's label (logged with the hparams).
    """

    def __init__(self, loggers: Sequence[Logger] | None, config_text: str | None, label: str) -> None:
        self._given = None if loggers is None else list(loggers)
        self._loggers: list[Logger] | None = None
        self.config_text = config_text
        self.label = label

    def loggers(self, engine: Engine) -> list[Logger]:
        """The loggers, built on first use."""
        if self._loggers is None:
            default = TensorBoardLogger(save_dir=str(engine.run_dir.root), name="", version="tensorboard")
            self._loggers = [default] if self._given is None else self._given
        return self._loggers

    def _log(self, engine: Engine, scalars: dict[str, float], step: int) -> None:
        for logger in self.loggers(engine):
            logger.log_metrics(scalars, step=step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.flush()  # visible to a running TensorBoard at once

    @rank_zero_only
    def on_round_end(self, engine: Engine, record: dict[str, Any]) -> None:
        self._log(engine, round_scalars(record), record["round"])
        for logger in self.loggers(engine):
            if isinstance(logger, TensorBoardLogger):
                for model, per_client in record.get("eval", {}).items():
                    _client_histograms(logger, engine, model, per_client, record["round"])

    @rank_zero_only
    def on_post_federation_client_end(self, engine: Engine, record: dict[str, Any]) -> None:
        prefix = f"post_federation/client_{record['client']}"
        scalars = {f"{prefix}/finetune_loss/{task}": v for task, v in record.get("finetune_loss", {}).items()}
        scalars.update({f"{prefix}/{key}": v for key, v in numbers(record["algorithm"]).items()})
        if scalars:
            self._log(engine, scalars, record["round"])

    @rank_zero_only
    def on_fit_end(self, engine: Engine, results: dict[str, Any]) -> None:
        config = yaml.safe_load(self.config_text) if self.config_text else {}
        params = {k: v for k, v in flatten(config).items() if isinstance(v, str | int | float | bool)}
        params["algorithm"] = self.label
        metrics = {
            f"final/{model}/{task}/{metric}": value
            for model, per_task in results["summary"].items()
            for task, values in per_task.items()
            for metric, value in values.items()
            if metric not in ("clients", "samples")
        }
        for logger in self.loggers(engine):
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(params, metrics)
            else:
                logger.log_hyperparams(params)

    @rank_zero_only
    def teardown(self, engine: Engine) -> None:
        for logger in self._loggers or []:
            logger.finalize("success")
        self._loggers = None


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one round's ``metrics.jsonl`` record, by TensorBoard tag."""
    scalars: dict[str, float] = {
        "comm/bytes_up": record["bytes_up"],
        "comm/bytes_down": record["bytes_down"],
        "round/seconds": record["seconds"],
        "round/failed_clients": len(record["failed_clients"]),
    }
    for cid, metrics in record["train"].items():
        scalars.update({f"client_{cid}/{k}": v for k, v in metrics.items()})
    scalars.update({f"algorithm/{k}": v for k, v in record["algorithm"].items()})
    for model, per_task in record.get("summary", {}).items():
        for task, values in per_task.items():
            scalars.update({f"{model}/{task}/{k}": v for k, v in values.items()})
    for model, per_type in record.get("summary_task_type", {}).items():
        for group, values in per_type.items():
            scalars.update({f"{model}/task_type/{group}/{k}": v for k, v in values.items()})
    for model, per_client in record.get("eval", {}).items():
        for cid, per_task in per_client.items():
            for task, values in per_task.items():
                scalars.update({f"client_{cid}/{model}/{task}/{k}": v for k, v in values.items()})
    return scalars


def _client_histograms(
    logger: TensorBoardLogger, engine: Engine, model: str, per_client: dict[str, Any], step: int
) -> None:
    """One histogram per task and metric of the values over clients (``<model>/<task>/<metric>/clients``)."""
    experiment = logger.experiment
    for task in engine.tasks:
        rows = [per_task[task] for per_task in per_client.values() if task in per_task]
        for metric in sorted({m for row in rows for m in row} - {"samples"}):
            values = np.array([row[metric] for row in rows if metric in row], dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size:
                experiment.add_histogram(f"{model}/{task}/{metric}/clients", values, step)
    experiment.flush()


def flatten(values: dict[str, Any], prefix: str = "", separator: str = "/") -> dict[str, Any]:
    """A nested dict as flat ``a/b/c`` keys (lists are kept as values)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{separator}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name, separator))
        else:
            flat[name] = value
    return flat


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The numbers of a nested dict as flat ``a/b/c`` scalars."""
    return {k: float(v) for k, v in flatten(values).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def loggers_of(setting: Any) -> list[Logger] | None:
    """The loggers of ``--trainer.logger``: ``None`` (the default TensorBoard logger) for ``None``/``True``."""
    if setting is None or setting is True:
        return None
    if setting is False:
        return []
    loggers = list(setting) if isinstance(setting, list | tuple) else [setting]
    wrong = [type(x).__name__ for x in loggers if not isinstance(x, Logger)]
    if wrong:
        raise ValueError(f"--trainer.logger must be Lightning loggers, got {wrong}")
    return loggers
