"""The ``tapl`` command: a ``LightningCLI`` whose subcommands run a federation instead of one ``Trainer``.

``tapl fit --config experiments/demo.yaml`` runs a federation; ``tapl test ... --ckpt_path last`` evaluates
a checkpointed one; ``tapl compare ... --algorithms FedAvg,TAP --seeds 0,1`` runs several and compares
them. Every class is configurable from YAML or flags: ``--model`` (encoders), ``--data`` (tasks, clients,
partitioner), ``--algorithm`` (a built-in short name or any class path),
``--federation`` (rounds, sampling, seed, evaluation), ``--optimizer``, ``--trainer`` (as in Lightning,
applied to every client visit) and ``--run_dir``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from jsonargparse import lazy_instance
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, OptimizerCallable
from rich.logging import RichHandler
from typing_extensions import override

from tapl.algorithms import Algorithm, FedAvg
from tapl.compare import CompareError, compare
from tapl.components import ComponentMismatchError
from tapl.datamodules.federated import FederatedDataModule
from tapl.federation import FederatedOrchestrator, FederationConfig, FederationError
from tapl.models.foundation import FoundationModel
from tapl.run_dir import RunDirError

_SKIPPED_METHOD_ARGS = {
    "model",
    "datamodule",
    "train_dataloaders",
    "val_dataloaders",
    "dataloaders",
    "verbose",
    "weights_only",
}


class TaplCLI(LightningCLI):
    """LightningCLI for federations: ``fit`` runs (or resumes) one, ``test`` evaluates a checkpoint of one."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_callback", None)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault(
            "parser_kwargs",
            {
                "default_env": False,
                "fit": {"description": "Run a federation (or resume one with --ckpt_path last), then test it."},
                "test": {"description": "Evaluate a checkpointed federation on every client's test split."},
            },
        )
        self.orchestrator: FederatedOrchestrator | None = None
        super().__init__(args=args, run=run, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {"fit": set(_SKIPPED_METHOD_ARGS), "test": set(_SKIPPED_METHOD_ARGS)}

    @override
    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The seed is --federation.seed; LightningCLI's --seed_everything would be a second source of truth.
        pass

    @override
    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.add_class_arguments(FoundationModel, "model", fail_untyped=False, sub_configs=True)
        parser.add_class_arguments(FederatedDataModule, "data", fail_untyped=False, sub_configs=True)
        parser.add_subclass_arguments(Algorithm, "algorithm", default=lazy_instance(FedAvg), required=False)
        parser.add_class_arguments(FederationConfig, "federation")
        parser.add_argument(
            "--optimizer",
            type=OptimizerCallable,
            default={"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "weight_decay": 0.01}},
            help="Optimizer of every local fit, e.g. --optimizer AdamW --optimizer.lr 3e-4.",
        )
        parser.add_argument(
            "--run_dir",
            type=str,
            default="runs/default",
            help="Run directory: config.yaml, metrics.jsonl, TensorBoard events, checkpoints, results.",
        )
        parser.link_arguments("data", "model.tasks", compute_fn=_task_list, apply_on="instantiate")

    @override
    def _set_seed(self) -> None:
        # Seeds the model's initialisation (LoRA, heads) from --federation.seed before it is built.
        federation = self._get(self.config, "federation")
        seed_everything(federation.seed, verbose=False)

    @override
    def _parse_ckpt_path(self) -> None:
        # tapl checkpoints are directories handled by the orchestrator, not Lightning checkpoint files.
        pass

    @override
    def instantiate_classes(self) -> None:
        self.config_init = self.parser.instantiate(self.config)
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
        raw = self.config[self.subcommand] if self.subcommand else self.config
        self.orchestrator = FederatedOrchestrator(
            model=config["model"],
            data=config["data"],
            algorithm=config["algorithm"],
            federation=config["federation"],
            run_dir=config["run_dir"],
            trainer=dict(config["trainer"]),
            optimizer=config["optimizer"],
            config_text=self._parser(self.subcommand).dump(raw, skip_unset=False),
        )

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        assert self.orchestrator is not None
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        getattr(self.orchestrator, subcommand)(ckpt_path=ckpt_path)


def _task_list(data: FederatedDataModule) -> list:
    return data.task_list


def _fit_in_process(args: list[str]) -> None:
    """One ``tapl fit`` of ``tapl compare``, in this process (its own arguments replace the command line's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
        TaplCLI(args=args)


def _configure_logging() -> None:
    handler = RichHandler(show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
    logging.getLogger("tapl").setLevel(logging.INFO)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``tapl`` command (``fit``, ``test``, and ``compare``: see :mod:`tapl.compare`)."""
    _configure_logging()
    argv = sys.argv[1:] if args is None else list(args)
    try:
        if argv[:1] == ["compare"]:
            compare(argv[1:], fit=_fit_in_process)
        else:
            TaplCLI(args=args)
    except (CompareError, RunDirError, FederationError, ComponentMismatchError, FileNotFoundError, ValueError) as error:
        sys.stderr.write(f"tapl: error: {error}\n")
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
