"""The ``tapl`` command: a ``LightningCLI`` whose subcommands run federations instead of one ``Trainer``.

``tapl fit --config experiments/demo.yaml`` runs a federation; ``tapl test ... --ckpt_path last`` evaluates
a checkpointed one; ``tapl compare ... --algorithms FedAvg,TAP --seeds 0,1`` runs several and compares
them. Every class is configurable from YAML or flags: ``--model`` (encoders), ``--data`` (tasks, clients,
partitioner), ``--algorithm`` (a built-in short name or any class path), ``--federation`` (rounds, sampling,
seed, evaluation), ``--optimizer``, ``--trainer`` (as in Lightning, applied to every client visit), and where the
run goes: ``--run_root`` (a new ``version_N`` under it per run) or ``--run_dir`` (one exact directory); see
:mod:`tapl.run_versions`. Naming another class for an option drops the earlier class's init args (see
:mod:`tapl.parser`).

Failures the user can fix (a bad argument, configuration, data file, checkpoint or run directory, a failed
write) end with one line ``tapl: error: ...``: exit status 2 for a bad argument, 1 otherwise. Ctrl-C stops
the run with status 130 and says how to resume it. ``TAPL_DEBUG=1`` also prints the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import yaml
from jsonargparse import Namespace, lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_only
from rich.logging import RichHandler
from typing_extensions import override

import tapl.algorithms
from tapl import compare
from tapl.algorithms import Algorithm, FedAvg
from tapl.datamodules.federated import FederatedDataModule
from tapl.engine.clients import ClientWorker
from tapl.errors import Stopped, TaplError
from tapl.federation import FederatedOrchestrator, FederationConfig
from tapl.models.foundation import FoundationModel
from tapl.parser import TaplArgumentParser
from tapl.run_dir import RunDirectory, RunDirError
from tapl.run_lock import RunLock
from tapl.run_versions import RunChoice, choose_run_dir, release_if_unused, share_with_other_ranks

log = logging.getLogger(__name__)

#: Parameters of the subcommand methods that are not options: LightningCLI passes the model and data itself.
_SKIPPED_METHOD_ARGS = {"model", "datamodule"}
#: The root of versioned run directories when neither the config nor the command line names one.
DEFAULT_RUN_ROOT = "runs/default"


class Commands:
    """What runs a ``tapl`` subcommand, in the place of Lightning's ``Trainer``.

    ``LightningCLI`` makes a subcommand of each method of its trainer class that :meth:`TaplCLI.subcommands`
    names, with the method's own parameters as the subcommand's options (``--ckpt_path``; compare's
    ``--algorithms``, ``--seeds``, ...), and calls the method on ``cli.trainer``: an instance of this class that
    :meth:`TaplCLI.instantiate_classes` builds with what the subcommand needs.

    Args:
        orchestrator: The federation that ``fit`` and ``test`` run.
        comparison: What ``compare`` runs, given its options (see :func:`tapl.compare.compare`).
    """

    def __init__(
        self,
        orchestrator: FederatedOrchestrator | None = None,
        comparison: Callable[[compare.CompareOptions], Path] | None = None,
    ) -> None:
        self.orchestrator = orchestrator
        self.comparison = comparison

    def fit(
        self,
        model: Any = None,
        datamodule: Any = None,
        ckpt_path: str | None = None,
        runtime: Literal["inprocess", "flower"] = "inprocess",
    ) -> None:
        """Run a federation (or resume one with --ckpt_path last), then test it.

        Args:
            model: Unused: the orchestrator holds the model.
            datamodule: Unused: the orchestrator holds the data.
            ckpt_path: Resume from ``last`` (the newest checkpoint of the run directory; without --run_dir, of
                the newest version_N under --run_root) or from a checkpoint directory, such as
                RUN_DIR/checkpoints/round-000004; unset: a new run.
            runtime: Where the clients run: ``inprocess`` (one after another in this process) or ``flower``
                (Flower's simulation runtime, one SuperNode per client, or the deployment whose ServerApp runs
                this, launched with ``flwr run``; needs ``pip install -e '.[flower]'``).
        """
        assert self.orchestrator is not None, "fit needs the federation that TaplCLI builds"
        self._run(functools.partial(self.orchestrator.fit, ckpt_path=ckpt_path), runtime)

    def test(
        self,
        model: Any = None,
        datamodule: Any = None,
        ckpt_path: str | None = "last",
        runtime: Literal["inprocess", "flower"] = "inprocess",
    ) -> None:
        """Evaluate a checkpointed federation on every client's test split.

        Args:
            model: Unused: the orchestrator holds the model.
            datamodule: Unused: the orchestrator holds the data.
            ckpt_path: ``last`` or unset (the newest checkpoint of the run directory; without --run_dir, of the
                newest version_N under --run_root) or a checkpoint directory, such as RUN_DIR/checkpoints/final.
            runtime: Where the clients run: as the run did (a run on Flower keeps its clients' stores on their
                nodes, so it is tested there).
        """
        assert self.orchestrator is not None, "test needs the federation that TaplCLI builds"
        self._run(functools.partial(self.orchestrator.test, ckpt_path=ckpt_path), runtime)

    def _run(self, job: Callable[[], Any], runtime: str) -> None:
        """``job`` (the orchestrator's fit or test) here, or with the clients on Flower."""
        if runtime == "flower":
            flower_runtime().on_flower(self.orchestrator, node_worker, job)
        else:
            job()

    def compare(
        self,
        algorithms: str,
        model: Any = None,
        datamodule: Any = None,
        seeds: str = "0",
        baseline: str | None = None,
        jobs: int = 1,
    ) -> None:
        """Run several algorithms and seeds on the same federation and compare them.

        Args:
            algorithms: Comma-separated, e.g. FedAvg,FedProx,PerFedAvg,TAP; each run sets --algorithm to one.
            model: Unused: each run builds its own.
            datamodule: Unused: each run builds its own.
            seeds: Comma-separated federation seeds, e.g. 0,1,2; each run sets --federation.seed to one.
            baseline: ALGORITHM[:MODEL], the model every other one is paired with on the same clients, e.g.
                FedAvg:global+FT (default: the first algorithm's global+FT model, else its personalized one;
                MODEL defaults the same way).
            jobs: Runs at once, each in its own process with cores/jobs CPU threads and its output in
                RUN_DIR/<algorithm>/seed-<seed>.log (1: one after another, in this process).
        """
        assert self.comparison is not None, "compare needs the comparison that TaplCLI sets up"
        self.comparison(compare.compare_options(algorithms, seeds, baseline, jobs))


class TaplCLI(LightningCLI):
    """LightningCLI for federations: ``fit`` runs (or resumes) one, ``test`` evaluates a checkpoint of one,
    ``compare`` runs several algorithms and seeds.

    Attributes:
        orchestrator: The federation built for ``fit`` and ``test`` (and without a subcommand, ``run=False``).
        run_choice: Its run directory and why that one.
    """

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", TaplArgumentParser)
        kwargs.setdefault("trainer_class", Commands)
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
                "compare": {
                    "description": "Run several algorithms and seeds on the same federation and compare them. "
                    "Every run is a `tapl fit` into RUN_DIR/<algorithm>/seed-<seed> (RUN_DIR: --run_dir, else "
                    "RUN_ROOT/compare) with the other arguments given here; --algorithm.NAME VALUE applies to the "
                    "algorithms that take NAME.",
                    "exit_on_error": False,
                },
            },
        )
        self.orchestrator: FederatedOrchestrator | None = None
        self.run_choice: RunChoice | None = None
        self._compare_argv: list[str] = []
        try:
            super().__init__(args=args, run=run, **kwargs)
        finally:
            if self.run_choice is not None and self.run_choice.created:
                release_if_unused(self.run_choice.path)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {name: set(_SKIPPED_METHOD_ARGS) for name in ("fit", "test", "compare")}

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        assert isinstance(parser, TaplArgumentParser), "TaplCLI needs a TaplArgumentParser"
        parser.restart_switched_classes = True
        return parser

    @override
    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The federation's own options lead --help; Lightning's Trainer flags (most of its lines) come last.
        parser.add_class_arguments(FederationConfig, "federation")
        parser.add_subclass_arguments(Algorithm, "algorithm", default=lazy_instance(FedAvg), required=False)
        parser.add_class_arguments(FederatedDataModule, "data", fail_untyped=False, sub_configs=True)
        parser.add_class_arguments(FoundationModel, "model", fail_untyped=False, sub_configs=True)
        run = parser.add_argument_group("The local optimizer and where the run goes")
        parser.add_grouped_argument(
            run,
            "--optimizer",
            type=OptimizerCallable,
            default={"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "weight_decay": 0.01}},
            help="Optimizer of every local fit, e.g. --optimizer AdamW --optimizer.lr 3e-4.",
        )
        parser.add_grouped_argument(
            run,
            "--run_root",
            type=str,
            default=DEFAULT_RUN_ROOT,
            help="Where runs go: each new run in its own RUN_ROOT/version_N (N: one past the highest there); "
            "--ckpt_path last resumes, and test tests, the newest.",
        )
        parser.add_grouped_argument(
            run,
            "--run_dir",
            type=str | None,
            default=None,
            help="One exact run directory instead of a version under --run_root: config.yaml, metrics.jsonl, "
            "TensorBoard events, checkpoints, results.",
        )
        parser.add_lightning_class_args(Trainer, "trainer")
        parser.link_arguments("data", "model.tasks", compute_fn=_task_list, apply_on="instantiate")
        # LightningCLI seeds from --seed_everything before building anything; here that is --federation.seed.
        parser.link_arguments("federation.seed", "seed_everything")

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, dict | Namespace):
            self.config = parser.parse_object(args)
        else:
            argv = sys.argv[1:] if args is None else list(args)
            if argv[:1] == ["compare"]:
                # --algorithm.NAME VALUE applies per algorithm (the run's own --algorithm), not to this parse.
                self._compare_argv = argv[1:]
                argv = ["compare", *compare.split_overrides(self._compare_argv)[0]]
            self.config = parser.parse_args(argv)
        self._check_arguments(self._subconfig(self.config))

    def _check_arguments(self, config: Namespace) -> None:
        """Fail before anything is built on what the parser cannot check: compare's lists, the checkpoint."""
        if self.config.get("subcommand") == "compare":
            compare.compare_options(config["algorithms"], config["seeds"], config["baseline"], config["jobs"])
        if config.get("runtime") == "flower":
            flower_runtime()  # before the model is built: Flower is an optional extra
        ckpt_path = config.get("ckpt_path")
        if ckpt_path not in (None, "last") and not (Path(ckpt_path) / "state.pt").is_file():
            raise RunDirError(
                f"--ckpt_path {ckpt_path}: not a tapl checkpoint directory (no state.pt); give `last` or a "
                "directory such as RUN_DIR/checkpoints/round-000004."
            )

    @override
    def before_instantiate_classes(self) -> None:
        if self.subcommand == "compare":
            return
        config = self._subconfig(self.config)
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
    def instantiate_classes(self) -> None:
        if self.subcommand == "compare":
            # A comparison builds nothing itself: each of its runs is a `tapl fit` of its own.
            self.config_init, self.model, self.datamodule = self.config, None, None
            self.trainer = Commands(comparison=self._comparison())
            return
        self.config_init = self.parser.instantiate_classes(self.config)
        config = self._subconfig(self.config_init)
        self.model, self.datamodule = config["model"], config["data"]
        self.orchestrator = FederatedOrchestrator(
            model=config["model"],
            data=config["data"],
            algorithm=config["algorithm"],
            federation=config["federation"],
            run_dir=config["run_dir"],
            trainer=dict(config["trainer"]),
            optimizer=config["optimizer"],
            config_text=self._config_text(),
        )
        self.trainer = Commands(orchestrator=self.orchestrator)

    def _subconfig(self, config: Namespace) -> Namespace:
        """The subcommand's part of ``config`` (all of it without a subcommand)."""
        return config[self.config["subcommand"]] if "subcommand" in self.config else config

    def _config_text(self) -> str:
        """The resolved configuration of the subcommand as YAML, for the run's ``config.yaml``."""
        text = self.parser.dump(self.config, skip_unset=False)
        if "subcommand" not in self.config:
            return text
        return yaml.safe_dump(yaml.safe_load(text)[self.config["subcommand"]], sort_keys=False)

    def _comparison(self) -> Callable[[compare.CompareOptions], Path]:
        """What ``compare`` runs: each run a ``tapl fit`` in this process, checked first by this parser."""
        config = self._subconfig(self.config)
        rest, overrides = compare.split_overrides(self._compare_argv)
        return functools.partial(
            compare.compare,
            out=Path(config["run_dir"] or Path(config["run_root"]) / "compare"),
            overrides=overrides,
            fit_args=compare.fit_arguments(rest),
            fit=_fit_in_process,
            check=self.parser.parse_args,
            command=" ".join(["tapl compare", *self._compare_argv]),
        )


def flower_runtime() -> ModuleType:
    """:mod:`tapl.runtimes.flower`, imported only when asked for: Flower is an optional extra.

    Raises:
        TaplError: if Flower is not installed, saying how to install it.
    """
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise TaplError("--runtime flower needs Flower: pip install -e '.[flower]'") from None
    from tapl.runtimes import flower

    return flower


class _NodeCLI(TaplCLI):
    """The federation of a config as a node of a distributed runtime builds it: the server holds the run
    directory (and its lock), so the node neither chooses nor checks one."""

    @override
    def before_instantiate_classes(self) -> None:
        pass


#: Options of ``tapl fit`` that are not part of the federation (a node builds its client side without them).
_COMMAND_OPTIONS = ("ckpt_path", "runtime")


def node_worker(config_text: str) -> ClientWorker:
    """The client side of the federation of ``config_text`` (a run's resolved ``fit`` config), as a node of a
    distributed runtime runs it: set up, its data's values not checked again (the server checked them)."""
    config = {k: v for k, v in yaml.safe_load(config_text).items() if k not in _COMMAND_OPTIONS}
    orchestrator = _NodeCLI(args=config, run=False).orchestrator
    assert orchestrator is not None, "TaplCLI builds the orchestrator without a subcommand"
    orchestrator.setup(check_values=False)
    return orchestrator.worker


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
    TaplCLI(args=args)


def _configure_logging() -> None:
    handler = RichHandler(show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler])
    logging.getLogger("tapl").setLevel(logging.INFO)


#: Failures reported in one line: tapl's own, and those of the file system (a missing file, a full disk).
EXPECTED_ERRORS = (TaplError, OSError, ValueError)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``tapl`` command (``fit``, ``test`` and ``compare``)."""
    _configure_logging()
    argv = sys.argv[1:] if args is None else list(args)
    debug = os.environ.get("TAPL_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}
    try:
        with _stop_on_ctrl_c():
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
    """A jsonargparse error in one line, naming options as typed (``--algorithms``, not ``compare.algorithms``);
    an unknown algorithm also lists the built-in ones."""
    text = re.sub(r"(arguments are required: )(?:(?:fit|test|compare)\.)?([\w.]+)", r"\1--\2", _one_line(message))
    unknown = re.search(r'Parser key "algorithm":\s+- Expected a path but (\S+) either not accessible', message)
    if unknown:
        reasons = [r.strip() for r in text.split(" - ")[2:] if not r.startswith("Expected a dot import path")]
        names = ", ".join(sorted(tapl.algorithms.BUILT_IN))
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
