"""Federated algorithms as plugins of one small interface; select one with ``--algorithm NAME``."""

from tapl.algorithms.base import Algorithm
from tapl.algorithms.ditto import Ditto
from tapl.algorithms.fedavg import FedAvg
from tapl.algorithms.fedprox import FedProx
from tapl.algorithms.fedrep import FedRep
from tapl.algorithms.local import Local
from tapl.algorithms.perfedavg import PerFedAvg
from tapl.algorithms.tap import TAP

__all__ = ["TAP", "Algorithm", "Ditto", "FedAvg", "FedProx", "FedRep", "Local", "PerFedAvg"]
