"""One model: its state machine (:mod:`.model`) and the four ways to evict its process
(:mod:`.eviction`: ``keep_running``, ``stop``, ``cuda_suspend``; :mod:`.checkpoint`: dump and
the restore sequence).

A model knows nothing about requests or other models; the switcher decides *when*, the model
does *how*, one transition at a time (the switcher serializes them)."""

from .model import Model, TransitionError

__all__ = ["Model", "TransitionError"]
