"""Federated data: task datasets, their partition over clients, and multi-task collation."""

from tapl.datamodules.collate import MultiTaskCollator
from tapl.datamodules.federated import ClientDataset, ClientGroup, ClientSpec, FederatedDataModule, TaskData
from tapl.datamodules.partitioners import IID, Dirichlet, Grouped, Partitioner, Shards

__all__ = [
    "IID",
    "ClientDataset",
    "ClientGroup",
    "ClientSpec",
    "Dirichlet",
    "FederatedDataModule",
    "Grouped",
    "MultiTaskCollator",
    "Partitioner",
    "Shards",
    "TaskData",
]
