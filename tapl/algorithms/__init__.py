"""Federated algorithms as plugins of one small interface; select one with ``--algorithm NAME``."""

from tapl.algorithms.base import Algorithm
from tapl.algorithms.fedavg import FedAvg

__all__ = ["Algorithm", "FedAvg"]
