"""Federated data: task datasets, their partition over clients, and multi-task collation."""

from tapl.datamodules.collate import MultiTaskCollator
from tapl.datamodules.federated import ClientDataset, ClientGroup, ClientSpec, FederatedDataModule, TaskData
from tapl.datamodules.partitioners import IID, Dirichlet, Partitioner

__all__ = [
    "IID",
    "ClientDataset",
    "ClientGroup",
    "ClientSpec",
    "Dirichlet",
    "FederatedDataModule",
    "MultiTaskCollator",
    "Partitioner",
    "TaskData",
]
