"""Federated algorithms as plugins of one small interface; select one with ``--algorithm NAME``."""

from tapl.algorithms.base import Algorithm
from tapl.algorithms.fedavg import FedAvg
from tapl.algorithms.tap import TAP

__all__ = ["TAP", "Algorithm", "FedAvg"]
