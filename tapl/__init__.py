"""tapl: personalized federated fine-tuning of foundation models across tasks and modalities."""

from tapl.algorithms import Algorithm, FedAvg
from tapl.api import ClientUpdate, FitResult
from tapl.client import ClientModule
from tapl.context import ClientContext
from tapl.federation import FederatedOrchestrator, FederationConfig
from tapl.models import FoundationModel
from tapl.tasks import Task, TaskType

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "ClientContext",
    "ClientModule",
    "ClientUpdate",
    "FedAvg",
    "FederatedOrchestrator",
    "FederationConfig",
    "FitResult",
    "FoundationModel",
    "Task",
    "TaskType",
]
