"""The engine's rooms, each with one job, and its callbacks; :mod:`tapl.federation` runs the round loop over them.

Rooms: :mod:`~tapl.engine.config` (settings), :mod:`~tapl.engine.local_training` (a fit or evaluation on one
client's data), :mod:`~tapl.engine.client_store` (every client's own state), :mod:`~tapl.engine.clients` (the
client side: a client's visit, evaluation and post-federation stage), :mod:`~tapl.engine.evaluation`,
:mod:`~tapl.engine.post_federation`, :mod:`~tapl.engine.results` and :mod:`~tapl.engine.checkpointing`.
Callbacks (:mod:`~tapl.engine.callbacks`): :mod:`~tapl.engine.logging`, :mod:`~tapl.engine.progress`,
:mod:`~tapl.engine.plateau` and the checkpoint schedule.
"""
