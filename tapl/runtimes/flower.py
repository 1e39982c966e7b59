"""The Flower runtime: a tapl federation as a Flower App (``pip install -e '.[flower]'``).

The ``ServerApp`` runs the :class:`~tapl.federation.FederatedOrchestrator` round loop with a :class:`FlowerWorker`:
a proxy of the SuperNodes, which turns each visit, evaluation and post-federation stage into a Message to the
node of that client, and its reply back into what the round loop expects (an error reply raises, so the round
reports the client as a failure). The ``ClientApp`` runs that work through a
:class:`~tapl.engine.clients.ClientWorker` built from the same tapl config, and keeps the client's store in the
node's ``Context.state``: personal state stays on the node, and only what the algorithm uploads crosses the
network. Component states travel flattened (``component/parameter``) in ArrayRecords, everything else as JSON in
ConfigRecords.

Which tapl client a node is comes from its node config: ``tapl-client`` on a deployed SuperNode
(``--node-config 'tapl-client=2'``), else the simulation runtime's ``partition-id`` (the n-th client by id).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shlex
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from tapl.algorithms.base import Algorithm
from tapl.api import ClientUpdate, FederationInfo, Instruction
from tapl.components import ComponentShapes, ComponentState, flatten, unflatten
from tapl.engine.clients import STORES_ON_NODES, ClientUnreachable, ClientWorker, Evaluated, check_upload
from tapl.engine.local_training import LocalTraining
from tapl.errors import TaplError
from tapl.federation import FederatedOrchestrator
from tapl.runtimes.node_stores import NodeStores, node_state_dir

log = logging.getLogger(__name__)

#: The node config key naming a SuperNode's tapl client (a client id of the config).
TAPL_CLIENT = "tapl-client"
#: The node config key of the simulation runtime's n-th SuperNode.
PARTITION_ID = "partition-id"
#: Message types: a round's visit, the post-federation stage, an evaluation, and a node joining the run.
VISIT, POST_FEDERATION, EVALUATE, JOIN = "train", "train.post_federation", "evaluate", "query"
#: ``Error.code`` of a client's work that raised (Flower's ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``).
CLIENT_RAISED = 2
#: The ConfigRecord of every message, the ArrayRecord of its tensors, and the node's state record of the run's
#: config and its client (kept when it joined).
_TAPL, _STATE, _JOINED = "tapl", "state", "tapl.joined"
#: Seconds between two pulls of replies (Flower's own send_and_receive waits 3 s); on the simulation runtime, where
#: a reply is a few milliseconds of work away, a shorter wait.
_POLL_SECONDS, _SIMULATION_POLL_SECONDS = 0.2, 0.05
#: Messages awaiting replies at once on the simulation runtime, per simulated ClientApp (one per CPU). Its engine
#: checks every waiting message for each of its SuperNodes ten times a second, so a round's messages sent at once
#: cost it more CPU than the ClientApps' own work on small models; a few per ClientApp keep each busy.
_SIMULATION_IN_FLIGHT_PER_APP = 8


class ClientFailed(TaplError, RuntimeError):
    """A node replied with an error, or did not reply, to a piece of client work."""


# -- what travels ------------------------------------------------------------------------------------------------


def _records(payload: Mapping[str, Any], state: ComponentState | None = None, **config: Any) -> RecordDict:
    records: dict[str, Any] = {_TAPL: ConfigRecord({"payload": json.dumps(payload), **config})}
    if state is not None:
        records[_STATE] = ArrayRecord({k: t.detach().cpu().contiguous() for k, t in flatten(state).items()})
    return RecordDict(records)


def _payload(content: RecordDict) -> dict[str, Any]:
    return json.loads(str(content[_TAPL]["payload"]))


def _state(content: RecordDict) -> ComponentState:
    if _STATE not in content:
        return {}
    return unflatten(dict(content[_STATE].to_torch_state_dict()))


# -- the client side ---------------------------------------------------------------------------------------------


#: Builds the client side of a tapl config (its YAML text) in a node's process: :func:`tapl.cli.node_worker`.
WorkerBuilder = Callable[[str], ClientWorker]


#: The one client side built in this process, by what built it: (builder's module, builder's name, config).
_built: dict[tuple[str, str, str], ClientWorker] = {}


def client_worker(build: WorkerBuilder, config_text: str) -> ClientWorker:
    """The client side of the tapl config ``config_text``, built once per process (a deployed node runs each
    message in a process of its own; a simulation actor serves many nodes).

    Kept by the builder's name, not its identity: a simulation actor unpickles the ClientApp with each message, and
    a builder defined in ``__main__`` (``python -m tapl.cli``) comes back as a new function every time.
    """
    key = (build.__module__, build.__qualname__, config_text)
    if key not in _built:
        _built.clear()
        _built[key] = build(config_text)
    return _built[key]


def node_client(node_config: Mapping[str, Any], clients: Sequence[int]) -> int:
    """The tapl client a node is, from its node config: ``tapl-client``, else the simulation's ``partition-id``
    (the n-th of ``clients`` by id).

    Raises:
        ValueError: if the node config names no client, or one the federation does not have.
    """
    if TAPL_CLIENT in node_config:
        client = int(node_config[TAPL_CLIENT])
    elif PARTITION_ID in node_config:
        ids = sorted(clients)
        partition = int(node_config[PARTITION_ID])
        if not 0 <= partition < len(ids):
            raise ValueError(f"partition-id {partition} is beyond the federation's {len(ids)} clients")
        client = ids[partition]
    else:
        raise ValueError(
            f"the node config names no tapl client: start the SuperNode with --node-config '{TAPL_CLIENT}=ID'"
        )
    if client not in clients:
        raise ValueError(f"{TAPL_CLIENT}={client}: the federation has clients {sorted(clients)}")
    return client


def _reply_to(message: Message, work: Callable[[], tuple[dict[str, Any], ComponentState | None]]) -> Message:
    """The reply to ``message``: what ``work()`` gives, or an error reply with the exception it raised."""
    try:
        payload, state = work()
        return Message(_records(payload, state), reply_to=message)
    except Exception as error:
        log.debug("".join(traceback.format_exception(error)))
        return Message(Error(CLIENT_RAISED, f"{type(error).__name__}: {error}"), reply_to=message)


def _join(message: Message, context: Context) -> Message:
    """A node joins the run: it says which client it is, and keeps the run's tapl config in its state."""

    def join() -> tuple[dict[str, Any], None]:
        config = message.content[_TAPL]
        client = node_client(context.node_config, _payload(message.content)["clients"])
        context.state[_JOINED] = ConfigRecord({"config": str(config["config"]), "client": client})
        return {"client": client}, None

    return _reply_to(message, join)


Work = Callable[[ClientWorker, int, int, dict[str, Any], ComponentState], tuple[dict[str, Any], ComponentState | None]]


def _client_work(build: WorkerBuilder, work: Work) -> Callable[[Message, Context], Message]:
    """A ClientApp handler running ``work(worker, client, round, payload, received)`` on the node's client, from
    the version of its stores the message names; an exception becomes an error reply, and a new version of the
    stores is written only when the work succeeded (and the message names one: an evaluation does not)."""

    @functools.wraps(work)
    def handler(message: Message, context: Context) -> Message:
        def run() -> tuple[dict[str, Any], ComponentState | None]:
            if _JOINED not in context.state:
                raise ClientFailed("the node has not joined the run (no query message reached it)")
            joined = context.state[_JOINED]
            worker = client_worker(build, str(joined["config"]))
            client, config = int(joined["client"]), message.content[_TAPL]
            if int(config["client"]) != client:
                raise ValueError(f"work of client {config['client']} was sent to the node of client {client}")
            stores = NodeStores(node_state_dir(context.node_config), str(config["run"]), client)
            base, version = str(config["base"]), str(config["version"])
            stores.load(worker, base)
            payload, state = work(
                worker, client, int(config["round"]), _payload(message.content), _state(message.content)
            )
            if version:
                stores.save(worker, version, {base, str(config["keep"])})
            return payload, state

        return _reply_to(message, run)

    return handler


def _visit(worker: ClientWorker, client: int, round: int, payload: dict[str, Any], received: ComponentState) -> Any:
    update = worker.visit(round, Instruction(client, received, payload["config"]))
    reply = {"client": update.client, "num_samples": update.num_samples, "metrics": update.metrics}
    return {**reply, "events": update.events}, update.state


def _evaluate(worker: ClientWorker, client: int, round: int, payload: dict[str, Any], received: ComponentState) -> Any:
    metrics, examples = worker.evaluate(client, round, received, payload["split"])
    return {"metrics": metrics, "examples": examples}, None


def _post_federation(
    worker: ClientWorker, client: int, round: int, payload: dict[str, Any], received: ComponentState
) -> Any:
    steps: list[str] = []
    record = worker.post_federation(client, round, received, bool(payload["fine_tune"]), steps.append)
    return {"record": record, "steps": steps}, None


def client_app(build: WorkerBuilder) -> ClientApp:
    """The ClientApp: joining the run (``query``), a round's visit (``train``), the post-federation stage
    (``train.post_federation``) and an evaluation (``evaluate``), each run on the client side that ``build`` makes
    of the tapl config the node got when it joined."""
    app = ClientApp()
    app.query()(_join)
    app.train()(_client_work(build, _visit))
    app.train("post_federation")(_client_work(build, _post_federation))
    app.evaluate()(_client_work(build, _evaluate))
    return app


# -- the server side ---------------------------------------------------------------------------------------------

#: One piece of client work to send: the client, the message type, its payload, the tensors it carries, and the
#: version of the client's stores it makes ("": it changes none).
Request = tuple[int, str, Mapping[str, Any], ComponentState | None, str]
#: A node's answer to a request: its payload and tensors, or why there is none.
Answer = tuple[dict[str, Any], ComponentState] | ClientFailed | ClientUnreachable
#: Flower's error codes of a message that never reached a node or whose reply never came back.
_UNDELIVERED = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)


class FlowerWorker(ClientWorker):
    """The client side as the server sees it on Flower: every piece of client work is a Message to the node of
    that client, sent through the ``Grid``, and a round's work goes to its nodes at once (up to ``in_flight``
    awaiting replies); the clients' stores live on the nodes.

    A node joins by saying which client it is (a ``query`` message); the federation starts once every client has
    a node. A node that leaves (Flower stops hearing its heartbeat) makes its client's work fail, or its
    evaluation missing, until a node naming that client joins again: before each round's work the server asks
    the nodes that are new.

    Args:
        grid: The ServerApp's grid.
        config_text: The tapl config the nodes build their client side from.
        info: The federation.
        algorithm: The algorithm (its server side runs here).
        training: Unused on the server; kept for the worker's interface.
        shapes: The shapes of every component's tensors (uploads are checked against them on arrival too).
        reply_timeout: Seconds to wait for a round's replies (``None``: until every node replied or left).
        join_timeout: Seconds to wait for every client's node to join (``None``: no limit).
        in_flight: The most messages awaiting replies at once (``None``: all of a round's, sent at once); the rest
            are sent as replies come.
        poll_seconds: Seconds between two pulls of replies.
    """

    def __init__(
        self,
        grid: Grid,
        config_text: str,
        info: FederationInfo,
        algorithm: Algorithm,
        training: LocalTraining,
        shapes: ComponentShapes,
        reply_timeout: float | None = None,
        join_timeout: float | None = None,
        in_flight: int | None = None,
        poll_seconds: float = _POLL_SECONDS,
    ) -> None:
        if in_flight is not None and in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        super().__init__(info, algorithm, training, shapes)
        self.grid = grid
        self.config_text = config_text
        self.reply_timeout = reply_timeout
        self.in_flight = in_flight
        self.poll_seconds = poll_seconds
        #: tapl client id -> the node id of its SuperNode.
        self.nodes: dict[int, int] = {}
        #: The run's key on the nodes (their stores of it are under that name); kept in checkpoints.
        self.run = uuid4().hex
        #: Client id -> the version of its stores the server accepted last (none: empty stores).
        self.versions: dict[int, str] = {}
        #: The versions the last checkpoint holds: the nodes keep them.
        self._kept: dict[int, str] = {}
        #: Nodes that joined (or failed to), so as not to ask them again.
        self._asked: set[int] = set()
        self._wait_for_every_client(join_timeout)

    def _message(self, node: int, message_type: str, payload: Mapping[str, Any], **config: Any) -> Message:
        content = _records(payload, config.pop("state", None), **config)
        return Message(content, dst_node_id=node, message_type=message_type)

    def _wait_for_every_client(self, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._join_new_nodes(strict=True)
            missing = sorted(set(self.info.clients) - set(self.nodes))
            if not missing:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise ClientFailed(
                    f"no SuperNode joined for clients {missing} within {timeout} s (node config {TAPL_CLIENT})"
                )
            time.sleep(self.poll_seconds)

    def _join_new_nodes(self, strict: bool = False) -> None:
        """Ask every node not asked yet which client it is; a node naming a client that has one replaces it (the
        client's node left and came back). With ``strict``, a node that cannot join stops the run."""
        new = [node for node in self.grid.get_node_ids() if node not in self._asked]
        if not new:
            return
        self._asked.update(new)
        join = {"clients": list(self.info.clients)}
        sent = self._push({node: self._message(node, JOIN, join, config=self.config_text) for node in new})
        for node, answer in sent:
            if isinstance(answer, Exception):
                if strict or isinstance(answer, ClientFailed):
                    raise ClientFailed(f"SuperNode {node} could not join the run: {answer}")
                log.warning("SuperNode %d did not join the run: %s", node, answer)
                continue
            client = int(answer[0]["client"])
            if strict and client in self.nodes:
                raise ClientFailed(f"SuperNodes {self.nodes[client]} and {node} both name client {client}")
            if client in self.nodes:
                log.warning("Client %d joined again on SuperNode %d (was %d)", client, node, self.nodes[client])
            self.nodes[client] = node

    def _push(self, messages: Mapping[Any, Message]) -> Iterator[tuple[Any, Answer]]:
        """Send ``messages`` (what each is for -> the message), at most ``in_flight`` of them awaiting a reply at a
        time; each answer as it comes."""
        queued = iter(messages.items())
        waiting: dict[str, Any] = {}
        deadline = None if self.reply_timeout is None else time.monotonic() + self.reply_timeout
        while True:
            while self.in_flight is None or len(waiting) < self.in_flight:
                whom, message = next(queued, (None, None))
                if message is None:
                    break
                ids = list(self.grid.push_messages([message]))
                if ids:
                    waiting[ids[0]] = whom
                else:
                    node = message.metadata.dst_node_id
                    yield whom, ClientUnreachable(f"Flower did not take the message to SuperNode {node}")
            if not waiting:
                return
            replies = list(self.grid.pull_messages(list(waiting)))
            for reply in replies:
                yield waiting.pop(reply.metadata.reply_to_message_id), _answer(reply)
            if waiting and deadline is not None and time.monotonic() > deadline:
                for whom in waiting.values():
                    yield whom, ClientUnreachable(f"no reply within {self.reply_timeout} s")
                for whom, _ in queued:
                    yield whom, ClientUnreachable(f"not sent within {self.reply_timeout} s")
                return
            if not replies:
                time.sleep(self.poll_seconds)

    def _exchange(
        self, round: int, requests: Sequence[Request], started: Callable[[int], None]
    ) -> Iterator[tuple[int, Answer]]:
        """Send every request to its client's node at once; each client's answer as it comes."""
        self._join_new_nodes()
        live = set(self.grid.get_node_ids())
        messages: dict[int, Message] = {}
        for client, message_type, payload, state, version in requests:
            node = self.nodes.get(client)
            if node not in live:
                yield client, ClientUnreachable(f"the SuperNode of client {client} left the federation")
                continue
            started(client)
            stores = {"run": self.run, "base": self.versions.get(client, ""), "keep": self._kept.get(client, "")}
            messages[client] = self._message(
                node, message_type, payload, state=state, client=client, round=round, version=version, **stores
            )
        yield from self._push(messages)

    def visit_all(
        self, round: int, instructions: Sequence[Instruction], started: Callable[[int], None]
    ) -> Iterator[tuple[int, ClientUpdate | Exception]]:
        """Every client's visit on its node, all at once: its upload, checked again on arrival, or why there is
        none (:class:`ClientFailed` with the node's error, e.g. ``ValueError: ...``; :class:`ClientUnreachable`)."""
        version = f"round-{round:06d}"
        requests = [(i.client, VISIT, {"config": i.config}, i.state, version) for i in instructions]
        for client, answer in self._exchange(round, requests, started):
            if isinstance(answer, Exception):
                yield client, answer
                continue
            payload, state = answer
            update = ClientUpdate(
                int(payload["client"]),
                state,
                int(payload["num_samples"]),
                dict(payload["metrics"]),
                list(payload["events"]),
            )
            try:
                check_upload(update, self.info.clients[client], self.shapes)
            except Exception as error:
                yield client, error
            else:
                self.versions[client] = version
                yield client, update

    def evaluate_all(
        self, round: int, received: Mapping[int, ComponentState], split: str, started: Callable[[int], None]
    ) -> Iterator[tuple[int, Evaluated | ClientUnreachable]]:
        """Every client's models on its ``split``, evaluated on its node.

        Raises:
            ClientFailed: with the error of a node whose evaluation raised.
        """
        requests = [(client, EVALUATE, {"split": split}, state, "") for client, state in received.items()]
        for client, answer in self._exchange(round, requests, started):
            if isinstance(answer, ClientFailed):
                raise answer
            yield (
                client,
                answer if isinstance(answer, ClientUnreachable) else (answer[0]["metrics"], answer[0]["examples"]),
            )

    def post_federation_all(
        self, round: int, received: Mapping[int, ComponentState], fine_tune: bool, notify: Callable[[int, str], None]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Every client's post-federation stage on its node; ``notify`` hears a client's steps once it is done.

        Raises:
            ClientFailed: with the error of a node whose stage raised.
            ClientUnreachable: for a client whose node left (the stage resumes at it).
        """
        version = "post-federation"
        requests = [(c, POST_FEDERATION, {"fine_tune": fine_tune}, state, version) for c, state in received.items()]
        for client, answer in self._exchange(round, requests, lambda client: notify(client, "post-federation")):
            if isinstance(answer, Exception):
                raise answer
            self.versions[client] = version
            payload = answer[0]
            for step in payload["steps"]:
                notify(client, step)
            yield client, payload["record"]

    def state_dict(self) -> dict[str, Any]:
        """Nothing of the clients' stores (they stay on their nodes): the run's key and the version of each
        client's stores, which the nodes keep from now on."""
        self._kept = dict(self.versions)
        nodes = {"run": self.run, "versions": {str(c): v for c, v in self.versions.items()}}
        return {"client_store": {}, "engine_store": {}, STORES_ON_NODES: nodes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume the run's key and versions of a checkpoint of a Flower run; an in-process run's checkpoint only
        without client stores (its nodes start with empty stores, as its clients had).

        Raises:
            ValueError: if the checkpoint holds client stores (those of an in-process run are not on any node).
        """
        if state["client_store"] or state["engine_store"]:
            raise ValueError(
                "the checkpoint holds client stores of an in-process run: the Flower runtime keeps them on the "
                "nodes and cannot resume it; resume with --runtime inprocess"
            )
        nodes = state.get(STORES_ON_NODES)
        if nodes:
            self.run = str(nodes["run"])
            self.versions = {int(c): str(v) for c, v in nodes["versions"].items()}
            self._kept = dict(self.versions)


def _answer(reply: Message) -> Answer:
    """What a reply says: its payload and tensors, or the error of the node (or of Flower, for an undelivered
    message)."""
    if not reply.has_error():
        return _payload(reply.content), _state(reply.content)
    if reply.error.code in _UNDELIVERED:
        return ClientUnreachable(reply.error.reason or f"Flower error {reply.error.code}")
    return ClientFailed(reply.error.reason or f"error {reply.error.code}")


#: What the server side does with the federation once its clients are on the nodes: ``orchestrator.fit`` (resuming
#: from a checkpoint or not) or ``orchestrator.test``; it returns the final results.
Job = Callable[[], dict[str, Any]]


def run(
    orchestrator: FederatedOrchestrator,
    grid: Grid,
    job: Job,
    reply_timeout: float | None = None,
    join_timeout: float | None = None,
    in_flight: int | None = None,
    poll_seconds: float = _POLL_SECONDS,
) -> dict[str, Any]:
    """Run ``job`` with ``orchestrator``'s clients on the nodes of ``grid`` (inside a ServerApp); the timeouts, the
    messages in flight and the polling are those of :class:`FlowerWorker`.

    Returns:
        What ``job`` returns: the final results.
    """
    if orchestrator.config_text is None:
        raise ValueError("the Flower runtime needs the orchestrator's config text (build it with TaplCLI)")
    orchestrator.worker_factory = functools.partial(
        FlowerWorker,
        grid,
        orchestrator.config_text,
        reply_timeout=reply_timeout,
        join_timeout=join_timeout,
        in_flight=in_flight,
        poll_seconds=poll_seconds,
    )
    return job()


def simulate(orchestrator: FederatedOrchestrator, build: WorkerBuilder, job: Job) -> dict[str, Any]:
    """Run ``job`` on Flower's simulation runtime, one SuperNode per client of ``orchestrator``, each simulated
    ClientApp on one CPU, with a few messages per ClientApp in flight at once.

    Args:
        orchestrator: The federation (built from a config: its ``config_text`` goes to the nodes).
        build: Builds the client side of that config on a node (:func:`tapl.cli.node_worker`).
        job: ``orchestrator.fit`` or ``orchestrator.test``, with their arguments.

    Returns:
        What ``job`` returns: the final results.
    """
    outcome: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            in_flight = _SIMULATION_IN_FLIGHT_PER_APP * len(os.sched_getaffinity(0))
            poll = _SIMULATION_POLL_SECONDS
            outcome["results"] = run(orchestrator, grid, job, in_flight=in_flight, poll_seconds=poll)
        except BaseException as error:  # handed to the caller of run_simulation, which would only log it
            outcome["error"] = error

    run_simulation(
        server_app=server,
        client_app=client_app(build),
        num_supernodes=len(orchestrator.data.clients),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if "error" in outcome:
        raise outcome["error"]
    if "results" not in outcome:
        raise ClientFailed("the Flower simulation ended without running the federation (see Flower's log above)")
    return outcome["results"]


@dataclass(frozen=True)
class Deployment:
    """The deployment whose ServerApp runs ``tapl fit`` or ``tapl test`` (launched with ``flwr run``)."""

    grid: Grid
    reply_timeout: float | None = None
    join_timeout: float | None = None


_deployment: ContextVar[Deployment | None] = ContextVar("tapl_flower_deployment", default=None)


def on_flower(orchestrator: FederatedOrchestrator, build: WorkerBuilder, job: Job) -> dict[str, Any]:
    """Run ``job`` with ``orchestrator``'s clients on Flower: on the deployment whose ServerApp runs this
    (:func:`server_app`), else on Flower's simulation runtime (:func:`simulate`)."""
    deployment = _deployment.get()
    if deployment is None:
        return simulate(orchestrator, build, job)
    return run(orchestrator, deployment.grid, job, deployment.reply_timeout, deployment.join_timeout)


def _seconds(value: Any) -> float | None:
    return float(value) if float(value) > 0 else None


#: The tapl commands a deployed ServerApp runs.
COMMANDS = ("fit", "test")


def server_app(tapl_main: Callable[[list[str]], None]) -> ServerApp:
    """The ServerApp of a deployment: ``tapl COMMAND ARGS --runtime flower`` on the SuperLink's machine, through
    ``tapl_main`` (:func:`tapl.cli.main`), with the clients on the SuperNodes.

    Its run config (``flwr run ... --run-config``): ``command``, ``fit`` or ``test``; ``args``, the arguments of
    the command (paths are those of the SuperLink's machine); ``reply-timeout``, seconds to wait for a round's
    replies (0: until every node replied or left); ``join-timeout``, seconds to wait for every client's SuperNode
    to join (0: no limit).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = context.run_config
        command, args = str(config.get("command", "fit")), shlex.split(str(config.get("args", "")))
        if command not in COMMANDS:
            raise ValueError(f"run config command={command!r}: give one of {COMMANDS}")
        timeouts = (_seconds(config.get("reply-timeout", 0)), _seconds(config.get("join-timeout", 0)))
        token = _deployment.set(Deployment(grid, *timeouts))
        try:
            tapl_main([command, *args, "--runtime", "flower"])
        except SystemExit as exit:
            if exit.code:
                raise RuntimeError(f"tapl {command} {shlex.join(args)} failed with exit status {exit.code}") from None
        finally:
            _deployment.reset(token)

    return app
