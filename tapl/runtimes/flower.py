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
import io
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from tapl.algorithms.base import Algorithm
from tapl.api import ClientUpdate, FederationInfo, Instruction
from tapl.components import ComponentShapes, ComponentState, flatten, unflatten
from tapl.engine.clients import STORES_ON_NODES, ClientWorker, check_upload
from tapl.engine.local_training import LocalTraining
from tapl.errors import TaplError
from tapl.federation import FederatedOrchestrator

log = logging.getLogger(__name__)

#: The node config key naming a SuperNode's tapl client (a client id of the config).
TAPL_CLIENT = "tapl-client"
#: The node config key of the simulation runtime's n-th SuperNode.
PARTITION_ID = "partition-id"
#: Message types: a round's visit, the post-federation stage, an evaluation, and which client a node is.
VISIT, POST_FEDERATION, EVALUATE, WHO = "train", "train.post_federation", "evaluate", "query"
#: ``Error.code`` of a client's work that raised (Flower's ``ErrorCode.CLIENT_APP_RAISED_EXCEPTION``).
CLIENT_RAISED = 2
#: The ConfigRecord of every message, the ArrayRecord of its tensors, and the node's state record of its stores.
_TAPL, _STATE, _STORES = "tapl", "state", "tapl.stores"


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


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


# -- the client side ---------------------------------------------------------------------------------------------


#: Builds the client side of a tapl config (its YAML text) in a node's process: :func:`tapl.cli.node_worker`.
WorkerBuilder = Callable[[str], ClientWorker]


@functools.lru_cache(maxsize=1)
def client_worker(build: WorkerBuilder, config_text: str) -> ClientWorker:
    """The client side of the tapl config ``config_text``, built once per process (a node's ClientApp process,
    or a simulation actor serving many nodes)."""
    return build(config_text)


def node_client(node_config: Mapping[str, Any], info: FederationInfo) -> int:
    """The tapl client a node is, from its node config: ``tapl-client``, else the simulation's ``partition-id``
    (the n-th client by id).

    Raises:
        ValueError: if the node config names no client, or one the federation does not have.
    """
    if TAPL_CLIENT in node_config:
        client = int(node_config[TAPL_CLIENT])
    elif PARTITION_ID in node_config:
        ids = sorted(info.clients)
        partition = int(node_config[PARTITION_ID])
        if not 0 <= partition < len(ids):
            raise ValueError(f"partition-id {partition} is beyond the federation's {len(ids)} clients")
        client = ids[partition]
    else:
        raise ValueError(
            f"the node config names no tapl client: start the SuperNode with --node-config '{TAPL_CLIENT}=ID'"
        )
    if client not in info.clients:
        raise ValueError(f"{TAPL_CLIENT}={client}: the federation has clients {sorted(info.clients)}")
    return client


def _restore_stores(context: Context, worker: ClientWorker, client: int) -> None:
    """Put the node's stores (kept in its ``Context.state``) into the worker, and only those."""
    kept = context.state.get(_STORES)
    for name, store in (("store", worker.store), ("engine_store", worker.engine_store)):
        store.load_state_dict({} if kept is None or name not in kept else {str(client): _from_bytes(bytes(kept[name]))})


def _keep_stores(context: Context, worker: ClientWorker, client: int) -> None:
    kept = {}
    for name, store in (("store", worker.store), ("engine_store", worker.engine_store)):
        if client in store:
            kept[name] = _to_bytes(store.checkout(client))
    context.state[_STORES] = ConfigRecord(kept)


Work = Callable[[ClientWorker, int, int, dict[str, Any], ComponentState], tuple[dict[str, Any], ComponentState | None]]


def _client_work(build: WorkerBuilder, work: Work) -> Callable[[Message, Context], Message]:
    """A ClientApp handler running ``work(worker, client, round, payload, received)`` on the node's client; an
    exception becomes an error reply, and the node's stores change only when the work succeeded."""

    @functools.wraps(work)
    def handler(message: Message, context: Context) -> Message:
        try:
            config = message.content[_TAPL]
            worker = client_worker(build, str(config["config"]))
            client = node_client(context.node_config, worker.info)
            asked = int(config["client"])
            if asked not in (-1, client):
                raise ValueError(f"work of client {asked} was sent to the node of client {client}")
            _restore_stores(context, worker, client)
            payload, state = work(
                worker, client, int(config["round"]), _payload(message.content), _state(message.content)
            )
            _keep_stores(context, worker, client)
            return Message(_records(payload, state), reply_to=message)
        except Exception as error:
            log.debug("".join(traceback.format_exception(error)))
            return Message(Error(CLIENT_RAISED, f"{type(error).__name__}: {error}"), reply_to=message)

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


def _who(worker: ClientWorker, client: int, round: int, payload: dict[str, Any], received: ComponentState) -> Any:
    return {"client": client}, None


def client_app(build: WorkerBuilder) -> ClientApp:
    """The ClientApp: a round's visit (``train``), the post-federation stage (``train.post_federation``), an
    evaluation (``evaluate``) and which client the node is (``query``), each run on the client side that
    ``build`` makes of the tapl config the message carries."""
    app = ClientApp()
    app.train()(_client_work(build, _visit))
    app.train("post_federation")(_client_work(build, _post_federation))
    app.evaluate()(_client_work(build, _evaluate))
    app.query()(_client_work(build, _who))
    return app


# -- the server side ---------------------------------------------------------------------------------------------


class FlowerWorker(ClientWorker):
    """The client side as the server sees it on Flower: every piece of client work is a Message to the node of
    that client, sent through the ``Grid``; the clients' stores live on the nodes.

    Args:
        grid: The ServerApp's grid.
        config_text: The tapl config the nodes build their client side from.
        info: The federation.
        algorithm: The algorithm (its server side runs here).
        training: Unused on the server; kept for the worker's interface.
        shapes: The shapes of every component's tensors (uploads are checked against them on arrival too).
        timeout: Seconds to wait for a reply (``None``: no limit) and for every client's node to connect.
    """

    def __init__(
        self,
        grid: Grid,
        config_text: str,
        info: FederationInfo,
        algorithm: Algorithm,
        training: LocalTraining,
        shapes: ComponentShapes,
        timeout: float | None = None,
    ) -> None:
        super().__init__(info, algorithm, training, shapes)
        self.grid = grid
        self.config_text = config_text
        self.timeout = timeout
        #: tapl client id -> the node id of its SuperNode.
        self.nodes = self._find_nodes()

    def _message(
        self,
        node: int,
        message_type: str,
        client: int,
        round: int,
        payload: Mapping[str, Any],
        state: ComponentState | None = None,
    ) -> Message:
        content = _records(payload, state, config=self.config_text, client=client, round=round)
        return Message(content, dst_node_id=node, message_type=message_type)

    def _find_nodes(self) -> dict[int, int]:
        """Ask every connected node which client it is (waiting until there are as many nodes as clients)."""
        wanted = len(self.info.clients)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        node_ids = list(self.grid.get_node_ids())
        while len(node_ids) < wanted:
            if deadline is not None and time.monotonic() > deadline:
                raise ClientFailed(
                    f"{len(node_ids)} SuperNodes connected within {self.timeout} s; the run needs {wanted}"
                )
            time.sleep(1.0)
            node_ids = list(self.grid.get_node_ids())
        messages = [self._message(node, WHO, -1, 0, {}) for node in node_ids]
        nodes: dict[int, int] = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise ClientFailed(f"SuperNode {node} could not set up its client: {reply.error.reason}")
            client = int(_payload(reply.content)["client"])
            if client in nodes:
                raise ClientFailed(f"SuperNodes {nodes[client]} and {node} both name client {client}")
            nodes[client] = node
        missing = sorted(set(self.info.clients) - set(nodes))
        if missing:
            raise ClientFailed(f"no SuperNode names clients {missing} (node config {TAPL_CLIENT})")
        return nodes

    def _ask(
        self,
        client: int,
        message_type: str,
        round: int,
        payload: Mapping[str, Any],
        state: ComponentState | None = None,
    ) -> tuple[dict[str, Any], ComponentState]:
        message = self._message(self.nodes[client], message_type, client, round, payload, state)
        replies = list(self.grid.send_and_receive([message], timeout=self.timeout))
        if not replies:
            raise ClientFailed(f"no reply from the SuperNode of client {client} within {self.timeout} s")
        reply = replies[0]
        if reply.has_error():
            raise ClientFailed(reply.error.reason or f"error {reply.error.code}")
        return _payload(reply.content), _state(reply.content)

    def visit(self, round: int, instruction: Instruction) -> ClientUpdate:
        """One client's visit on its node: its upload, checked again on arrival.

        Raises:
            ClientFailed: with the node's error (e.g. ``ValueError: ...``), or when it did not reply.
        """
        payload, state = self._ask(instruction.client, VISIT, round, {"config": instruction.config}, instruction.state)
        update = ClientUpdate(
            int(payload["client"]),
            state,
            int(payload["num_samples"]),
            dict(payload["metrics"]),
            list(payload["events"]),
        )
        check_upload(update, self.info.clients[instruction.client], self.shapes)
        return update

    def evaluate(self, client: int, round: int, received: ComponentState, split: str) -> Any:
        """The client's models on its ``split``, evaluated on its node."""
        payload, _ = self._ask(client, EVALUATE, round, {"split": split}, received)
        return payload["metrics"], payload["examples"]

    def post_federation(
        self, client: int, round: int, received: ComponentState, fine_tune: bool, notify: Callable[[str], None]
    ) -> dict[str, Any]:
        """The client's post-federation stage on its node; ``notify`` hears its steps once it is done."""
        payload, _ = self._ask(client, POST_FEDERATION, round, {"fine_tune": fine_tune}, received)
        for step in payload["steps"]:
            notify(step)
        return payload["record"]

    def state_dict(self) -> dict[str, Any]:
        """Nothing of the clients: their stores live on their nodes."""
        return {"client_store": {}, "engine_store": {}, STORES_ON_NODES: True}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Accept a checkpoint without client stores only (those of an in-process run cannot be sent to nodes).

        Raises:
            ValueError: if the checkpoint holds client stores.
            RunDirError: for a Flower run's checkpoint (simulated nodes lose their stores when a run ends).
        """
        if state["client_store"] or state["engine_store"]:
            raise ValueError(
                "the checkpoint holds client stores of an in-process run: the Flower runtime keeps them on the "
                "nodes and cannot resume it; resume with --runtime inprocess"
            )
        super().load_state_dict(state)  # refuses a Flower run's checkpoint: its nodes' stores are not in it


def server_app(orchestrator: FederatedOrchestrator, ckpt_path: str | None, outcome: dict[str, Any]) -> ServerApp:
    """A ServerApp running ``orchestrator.fit(ckpt_path)`` with its clients on the nodes; ``outcome`` receives
    the ``results`` or the ``error`` it raised."""
    if orchestrator.config_text is None:
        raise ValueError("the Flower runtime needs the orchestrator's config text (build it with TaplCLI)")
    config_text = orchestrator.config_text
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        orchestrator.worker_factory = functools.partial(FlowerWorker, grid, config_text)
        try:
            outcome["results"] = orchestrator.fit(ckpt_path=ckpt_path)
        except BaseException as error:  # handed to the caller of run_simulation, which would only log it
            outcome["error"] = error

    return app


def simulate(orchestrator: FederatedOrchestrator, build: WorkerBuilder, ckpt_path: str | None = None) -> dict[str, Any]:
    """Run ``orchestrator``'s federation on Flower's simulation runtime, one SuperNode per client, each simulated
    ClientApp on one CPU.

    Args:
        orchestrator: The federation (built from a config: its ``config_text`` goes to the nodes).
        build: Builds the client side of that config on a node (:func:`tapl.cli.node_worker`).
        ckpt_path: As for :meth:`~tapl.federation.FederatedOrchestrator.fit`.

    Returns:
        The final results, as :meth:`~tapl.federation.FederatedOrchestrator.fit` returns them.
    """
    outcome: dict[str, Any] = {}
    run_simulation(
        server_app=server_app(orchestrator, ckpt_path, outcome),
        client_app=client_app(build),
        num_supernodes=len(orchestrator.data.clients),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if "error" in outcome:
        raise outcome["error"]
    if "results" not in outcome:
        raise ClientFailed("the Flower simulation ended without running the federation (see Flower's log above)")
    return outcome["results"]
