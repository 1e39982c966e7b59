"""The ``tapl`` command: a ``LightningCLI`` whose subcommands run a federation instead of one ``Trainer``.

``tapl fit --config experiments/demo.yaml`` runs a federation; ``tapl test ... --ckpt_path last`` evaluates
a checkpointed one; ``tapl compare ... --algorithms FedAvg,TAP --seeds 0,1`` runs several and compares
them. Every class is configurable from YAML or flags: ``--model`` (encoders), ``--data`` (tasks, clients,
partitioner), ``--algorithm`` (a built-in short name or any class path),
``--federation`` (rounds, sampling, seed, evaluation), ``--optimizer``, ``--trainer`` (as in Lightning,
applied to every client visit), and where the run goes: ``--run_root`` (a new ``version_N`` under it per run) or
``--run_dir`` (one exact directory); see :mod:`tapl.run_versions`. Naming another class for an option drops the
earlier class's init args (see :mod:`tapl.parser`).

Failures the user can fix (a bad argument, configuration, data file, checkpoint or run directory, a failed
write) end with one line ``tapl: error: ...``: exit status 2 for a bad argument, 1 otherwise. Ctrl-C stops
the run with status 130 and says how to resume it. ``TAPL_DEBUG=1`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jsonargparse import lazy_instance
from lightning.fabric.utilities.seed import seed_everything
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from rich.logging import RichHandler
from typing_extensions import override

import tapl.algorithms
from tapl.algorithms import Algorithm, FedAvg
from tapl.compare import compare
from tapl.datamodules.federated import FederatedDataModule
from tapl.errors import Stopped, TaplError
from tapl.federation import FederatedOrchestrator, FederationConfig
from tapl.models.foundation import FoundationModel
from tapl.parser import TaplArgumentParser
from tapl.run_dir import RunDirectory, RunDirError
from tapl.run_lock import RunLock
from tapl.run_versions import RunChoice, choose_run_dir, release_if_unused, share_with_other_ranks

log = logging.getLogger(__name__)

_SKIPPED_METHOD_ARGS = {
    "model",
    "datamodule",
    "train_dataloaders",
    "val_dataloaders",
    "dataloaders",
    "verbose",
    "weights_only",
}
#: The root of versioned run directories when neither the config nor the command line names one.
DEFAULT_RUN_ROOT = "runs/default"


class TaplCLI(LightningCLI):
    """LightningCLI for federations: ``fit`` runs (or resumes) one, ``test`` evaluates a checkpoint of one.

    Attributes:
        orchestrator: The federation built for ``fit`` and ``test`` (and without a subcommand, ``run=False``).
        run_choice: Its run directory and why that one.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", TaplArgumentParser)
        kwargs.setdefault("save_config_callback", None)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault(
            "parser_kwargs",
            {
                "default_env": False,
                # Argument errors raise, so that main() reports them in one line without the usage banner.
                "exit_on_error": False,
                "fit": {
                    "description": "Run a federation (or resume one with --ckpt_path last), then test it.",
                    "exit_on_error": False,
                },
                "test": {
                    "description": "Evaluate a checkpointed federation on every client's test split.",
                    "exit_on_error": False,
                },
            },
        )
        self.orchestrator: FederatedOrchestrator | None = None
        self.run_choice: RunChoice | None = None
        try:
            super().__init__(args=args, run=run, **kwargs)
        finally:
            if self.run_choice is not None and self.run_choice.created:
                release_if_unused(self.run_choice.path)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {"fit": set(_SKIPPED_METHOD_ARGS), "test": set(_SKIPPED_METHOD_ARGS)}

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        assert isinstance(parser, TaplArgumentParser), "TaplCLI needs a TaplArgumentParser"
        parser.restart_switched_classes = True
        return parser

    @override
    def add_default_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The seed is --federation.seed; LightningCLI's --seed_everything would be a second source of truth.
        pass

    @override
    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The federation's own options lead --help; Lightning's Trainer flags (most of its lines) come last.
        parser.add_class_arguments(FederationConfig, "federation")
        parser.add_subclass_arguments(Algorithm, "algorithm", default=lazy_instance(FedAvg), required=False)
        parser.add_class_arguments(FederatedDataModule, "data", fail_untyped=False, sub_configs=True)
        parser.add_class_arguments(FoundationModel, "model", fail_untyped=False, sub_configs=True)
        parser.add_argument(
            "--optimizer",
            type=OptimizerCallable,
            default={"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "weight_decay": 0.01}},
            help="Optimizer of every local fit, e.g. --optimizer AdamW --optimizer.lr 3e-4.",
        )
        parser.add_argument(
            "--run_root",
            type=str,
            default=DEFAULT_RUN_ROOT,
            help="Where runs go: each new run in its own RUN_ROOT/version_N (N: one past the highest there); "
            "--ckpt_path last resumes, and test tests, the newest.",
        )
        parser.add_argument(
            "--run_dir",
            type=str | None,
            default=None,
            help="One exact run directory instead of a version under --run_root: config.yaml, metrics.jsonl, "
            "TensorBoard events, checkpoints, results.",
        )
        parser.add_lightning_class_args(self.trainer_class, "trainer")
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
        raw = self.config[self.subcommand] if self.subcommand else self.config
        self._choose_run_dir(raw)
        self.config_init = self.parser.instantiate(self.config)
        config = self.config_init[self.subcommand] if self.subcommand else self.config_init
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

    def _choose_run_dir(self, config: Any) -> None:
        """Choose the run directory (a new version under ``run_root`` unless ``run_dir`` names one or a run resumes)
        and write it into ``config``, then check it before the model is built."""
        exact = config["run_dir"] is not None
        self.run_choice = choose_run_dir(
            config["run_dir"],
            config["run_root"],
            config.get("ckpt_path"),
            self.subcommand or "fit",
            rank=rank_zero_only.rank,
            reserve=self.subcommand is not None,
        )
        # The run's config.yaml names its exact directory, so that `--config RUN/config.yaml` resumes that run.
        config["run_dir"] = str(self.run_choice.path)
        if rank_zero_only.rank != 0:
            return
        if not exact:
            share_with_other_ranks(self.run_choice)
        log.info("Run directory: %s (%s)", self.run_choice.path, self.run_choice.reason)
        if self.subcommand == "fit" and config.get("ckpt_path") is None:
            _check_no_run(self.run_choice.path, config["run_root"])
        RunLock.check_free(self.run_choice.path)  # a run directory in use fails before the model is built

    @override
    def _run_subcommand(self, subcommand: str) -> None:
        assert self.orchestrator is not None
        ckpt_path = self.config_init[subcommand].get("ckpt_path")
        getattr(self.orchestrator, subcommand)(ckpt_path=ckpt_path)


def _check_no_run(run_dir: Path, run_root: str) -> None:
    """Refuse a new run in a directory that holds one (before the model is built)."""
    if RunDirectory(run_dir).holds_run():
        raise RunDirError(
            f"{run_dir} already holds a run. Resume it with --ckpt_path last, or start a new one in another "
            f"--run_dir, or with --run_dir null in a new version_N under --run_root {run_root}."
        )


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


#: Failures reported in one line: tapl's own, and those of the file system (a missing file, a full disk).
EXPECTED_ERRORS = (TaplError, OSError, ValueError)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``tapl`` command (``fit``, ``test``, and ``compare``: see :mod:`tapl.compare`)."""
    _configure_logging()
    argv = sys.argv[1:] if args is None else list(args)
    debug = os.environ.get("TAPL_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        with _stop_on_ctrl_c():
            if argv[:1] == ["compare"]:
                compare(argv[1:], fit=_fit_in_process)
            else:
                TaplCLI(args=args)
    except argparse.ArgumentError as error:  # jsonargparse's, and tapl compare's own
        _fail(_argument_message(str(error), argv), 2, debug)
    except Stopped as stop:
        _fail(_stopped_message(stop, argv), 130, debug, prefix="tapl:")
    except EXPECTED_ERRORS as error:
        _fail(_one_line(str(error)) or type(error).__name__, 1, debug)


def _fail(message: str, code: int, debug: bool, prefix: str = "tapl: error:") -> None:
    if debug:
        traceback.print_exc()
    sys.stderr.write(f"{prefix} {message}\n")
    raise SystemExit(code) from None


@contextmanager
def _stop_on_ctrl_c() -> Iterator[None]:
    """Turn Ctrl-C into :class:`Stopped`, which Lightning's trainer passes on instead of exiting the process."""

    def stop(signum: int, frame: Any) -> None:
        raise Stopped()

    previous: Callable[..., Any] | int | None = None
    with contextlib.suppress(ValueError):  # not the main thread: leave Ctrl-C as it is
        previous = signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _argument_message(message: str, argv: list[str]) -> str:
    """A jsonargparse error in one line; an unknown algorithm also lists the built-in ones."""
    text = _one_line(message)
    unknown = re.search(r'Parser key "algorithm":\s+- Expected a path but (\S+) either not accessible', message)
    if unknown:
        reasons = [r.strip() for r in text.split(" - ")[2:] if not r.startswith("Expected a dot import path")]
        names = ", ".join(sorted(set(tapl.algorithms.__all__) - {"Algorithm"}))
        text = (
            f"unknown algorithm {unknown.group(1)!r}{f' ({reasons[0]})' if reasons else ''}: give a built-in one "
            f"({names}) or the class path of your own, e.g. mypackage.module.MyAlgorithm"
        )
    command = argv[0] if argv[:1] in (["fit"], ["test"], ["compare"]) else ""
    return f"{text} (see: tapl {command} --help)".replace("tapl  ", "tapl ")


def _stopped_message(stop: Stopped, argv: list[str]) -> str:
    """What a Ctrl-C stopped, and how to go on."""
    if argv[:1] == ["compare"]:
        return "stopped (Ctrl-C). Run the same command again to finish: finished runs are reused, the others resume."
    if stop.run_dir is None:
        return "stopped (Ctrl-C) before the run began."
    run_dir = RunDirectory(stop.run_dir)
    rounds = run_dir.round_checkpoints()
    if not rounds:
        return f"stopped (Ctrl-C) before the first checkpoint; {run_dir.root} holds no round to resume from."
    return (
        f"stopped (Ctrl-C); {run_dir.root} holds checkpoints up to {rounds[-1].name}. Resume with: "
        f"tapl fit --config {run_dir.root / 'config.yaml'} --ckpt_path last"
    )


if __name__ == "__main__":
    main()
