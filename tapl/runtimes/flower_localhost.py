"""A Flower deployment on this machine: a SuperLink and one SuperNode per client, each a process of its own, in
insecure mode on localhost, and runs launched with ``flwr run`` on the tapl Flower App (``flower-app/``).

It is how the tests and the overhead benchmark deploy; across machines, start the same processes by hand (see
the README, "Running across machines"). Every process is stopped on leaving the ``with`` block, whatever
happened inside it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import psutil

#: The tapl Flower App: the directory ``flwr run`` is given (a source checkout's ``flower-app/``).
APP_DIR = Path(__file__).resolve().parents[2] / "flower-app"
#: The SuperLink connection the deployment's ``flwr`` CLI knows it by.
CONNECTION = "tapl-localhost"


class DeploymentError(RuntimeError):
    """A process of the deployment did not start, or a run did not complete."""


@dataclass(frozen=True)
class RunOutcome:
    """A run launched with ``flwr run``: its Flower run id, final status and what ``flwr run --stream`` printed."""

    run_id: int
    status: str
    details: str
    output: str

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _executable(name: str) -> str:
    """A Flower command of this Python's environment."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise DeploymentError(f"{name} is not in {path.parent}: pip install -e '.[flower]'")
    return str(path)


class LocalDeployment:
    """A SuperLink and SuperNodes (one per client, ``--node-config 'tapl-client=ID'``) on localhost.

    Args:
        clients: The tapl client ids, one SuperNode each.
        workdir: Where the processes' logs and Flower homes go (a temporary directory if unset).
        env: Environment variables added to every process's (e.g. ``OMP_NUM_THREADS``, ``PYTHONPATH``).
        ready_timeout: Seconds to wait for the SuperLink to answer.
    """

    def __init__(
        self,
        clients: list[int],
        workdir: Path | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self.clients = list(clients)
        self._tmp = None if workdir is not None else tempfile.TemporaryDirectory(prefix="tapl-flower-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.ready_timeout = ready_timeout
        self.port = _free_port()
        self.env = {
            **os.environ,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            **(env or {}),
        }
        self.superlink: subprocess.Popen[bytes] | None = None
        #: client id -> its SuperNode's process.
        self.supernodes: dict[int, subprocess.Popen[bytes]] = {}
        self._node_ports = {client: _free_port() for client in self.clients}
        self._cli_home = self.workdir / "flwr-cli"
        self._cli_home.mkdir(parents=True, exist_ok=True)
        (self._cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        home = self.workdir / name
        home.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                command, cwd=self.workdir, env={**self.env, "FLWR_HOME": str(home)}, stdout=log, stderr=log
            )

    def start(self) -> None:
        """Start the SuperLink, wait until it answers, then start every client's SuperNode."""
        self.superlink = self._spawn(
            "superlink",
            [
                _executable("flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                ":flwr-in-memory:",
                "--disable-runtime-dependency-installation",  # tapl is installed; nothing is fetched
            ],
        )
        deadline = time.monotonic() + self.ready_timeout
        while not self._answers():
            if self.superlink.poll() is not None or time.monotonic() > deadline:
                raise DeploymentError(f"the SuperLink did not start; see {self.workdir / 'superlink.log'}")
            time.sleep(0.2)
        for client in self.clients:
            self.start_node(client)

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    def start_node(self, client: int) -> None:
        """Start (or restart) the SuperNode of ``client``; it keeps its stores in ``workdir/state-ID``."""
        self.supernodes[client] = self._spawn(
            f"supernode-{client}",
            [
                _executable("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(self._node_ports[client]),
                "--node-config",
                f'tapl-client={client} tapl-state-dir="{self.workdir / f"state-{client}"}"',
            ],
        )

    def kill_node(self, client: int) -> None:
        """Kill the SuperNode of ``client`` at once (SIGKILL), as a crash would, and what it was running."""
        process = self.supernodes[client]
        children = _descendants(process.pid)
        process.kill()
        process.wait()
        for child in children:
            child.kill()
        psutil.wait_procs(children, timeout=5)

    def run(
        self, tapl_args: list[str], command: str = "fit", timeout: float = 600, **run_config: float | str
    ) -> RunOutcome:
        """``flwr run`` of the tapl Flower App: ``tapl COMMAND TAPL_ARGS`` on the deployment, until the run ends.

        Args:
            tapl_args: Arguments of ``tapl fit`` or ``tapl test`` (the run config's ``args``).
            command: ``fit`` or ``test``.
            timeout: Seconds to wait for the run.
            run_config: More run config, e.g. ``reply_timeout=30`` for ``reply-timeout``.
        """
        run_id, output = self._submit(tapl_args, command, run_config, timeout, stream=True)
        listed = self._flwr(["ls", "--run-id", str(run_id), "--format", "json"], 60)
        run = json.loads(listed.stdout)["runs"][0]
        return RunOutcome(run_id, str(run["status"]), str(run.get("status-details", "")), output)

    def launch(self, tapl_args: list[str], command: str = "fit", **run_config: float | str) -> int:
        """Start ``tapl COMMAND TAPL_ARGS`` on the deployment without waiting for it; return the Flower run id."""
        return self._submit(tapl_args, command, run_config, 120, stream=False)[0]

    def _submit(
        self, tapl_args: list[str], command: str, run_config: dict[str, float | str], timeout: float, stream: bool
    ) -> tuple[int, str]:
        config = {
            "command": command,
            "args": shlex.join(tapl_args),
            **{key.replace("_", "-"): value for key, value in run_config.items()},
        }
        overrides = " ".join(f"{key}={json.dumps(value)}" for key, value in config.items())
        args = ["run", str(APP_DIR), CONNECTION, "--run-config", overrides, *(["--stream"] if stream else [])]
        launched = self._flwr(args, timeout)
        found = re.search(r"Successfully started run (\d+)", launched.stdout)
        if found is None:
            raise DeploymentError(f"flwr run did not start a run:\n{launched.stdout}\n{launched.stderr}")
        return int(found.group(1)), launched.stdout

    def stop_run(self, run_id: int) -> None:
        """Stop a run (``flwr stop``): its ServerApp ends at once, as a killed server would."""
        stopped = self._flwr(["stop", str(run_id), CONNECTION], 60)
        if stopped.returncode != 0:
            raise DeploymentError(f"flwr stop {run_id} failed:\n{stopped.stdout}\n{stopped.stderr}")

    def _flwr(self, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        env = {**self.env, "FLWR_HOME": str(self._cli_home)}
        return subprocess.run(
            [_executable("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def stop(self) -> None:
        """Stop the SuperNodes, then the SuperLink (SIGTERM, then SIGKILL after 10 s), then whatever they started
        (it stops on its own once its parent is gone; SIGKILL after 5 s)."""
        processes = [*self.supernodes.values(), *([self.superlink] if self.superlink else [])]
        started = [child for process in processes if process.poll() is None for child in _descendants(process.pid)]
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        _, lingering = psutil.wait_procs(started, timeout=5)
        for child in lingering:
            child.kill()
        psutil.wait_procs(lingering, timeout=5)
        self.supernodes.clear()
        self.superlink = None
        if self._tmp is not None:
            self._tmp.cleanup()

    def log(self, name: str) -> str:
        """The output of the process ``name`` (``superlink`` or ``supernode-ID``)."""
        return (self.workdir / f"{name}.log").read_text(errors="replace")


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
