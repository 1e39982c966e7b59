"""Federated algorithms as plugins of one small interface; select one with ``--algorithm NAME``.

The plugin API in one place: :class:`Algorithm` (the hooks), :class:`ClientContext` (what a client's work
sees), :class:`ClientUpdate`, :class:`Instruction` and :class:`Failure` (what travels between client and
server), :class:`ReportedModel` (the models reported per client), :class:`Objective` (a fit's local objective)
and :class:`FederationInfo` (the federation at setup).
"""

from tapl.algorithms.base import Algorithm
from tapl.algorithms.ditto import Ditto
from tapl.algorithms.fedavg import FedAvg
from tapl.algorithms.fedprox import FedProx
from tapl.algorithms.fedrep import FedRep
from tapl.algorithms.local import Local
from tapl.algorithms.perfedavg import PerFedAvg
from tapl.algorithms.tap import TAP
from tapl.api import ClientInfo, ClientUpdate, Failure, FederationInfo, FitResult, Instruction
from tapl.context import ClientContext
from tapl.objective import Objective, TrainingStep
from tapl.reported import ReportedModel

#: The algorithms tapl ships, selectable by short name.
BUILT_IN = ["TAP", "Ditto", "FedAvg", "FedProx", "FedRep", "Local", "PerFedAvg"]

__all__ = [
    "TAP",
    "Algorithm",
    "ClientContext",
    "ClientInfo",
    "ClientUpdate",
    "Ditto",
    "Failure",
    "FedAvg",
    "FedProx",
    "FedRep",
    "FederationInfo",
    "FitResult",
    "Instruction",
    "Local",
    "Objective",
    "PerFedAvg",
    "ReportedModel",
    "TrainingStep",
]
