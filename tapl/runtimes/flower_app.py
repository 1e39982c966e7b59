"""The tapl Flower App, for a deployment launched with ``flwr run`` (``flower-app/pyproject.toml`` names these)."""

from tapl.cli import main, node_worker
from tapl.runtimes.flower import client_app, server_app

#: ``tapl fit`` with the run config's ``args`` and ``--runtime flower``, on the SuperLink's machine.
server = server_app(main)
#: Each SuperNode's client (``--node-config 'tapl-client=ID'``), built from the config the server sends.
client = client_app(node_worker)
