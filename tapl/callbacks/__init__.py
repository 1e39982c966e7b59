"""Displays and hooks around a federated run."""

from tapl.callbacks.progress import RoundProgress

__all__ = ["RoundProgress"]
