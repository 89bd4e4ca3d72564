"""Threads that share a model take turns in sdrpn's calls on it.

A call that hooks the model's layers or changes its configuration for its duration
(answering with SDRPNLlava, the label maps' attention probe, self answers, the RPN's
backbone pass, EarlyExit) takes the model's turn, a re-entrant lock: two such calls on one
model never overlap, and the hooks a call sets act on its own thread's forwards only
(``probe``), so that another thread's forward of the model meanwhile is not read. Keyed by
the text decoder, the part that is hooked, and held weakly: a model that is dropped takes
its lock with it; the model itself holds no lock, so that it copies and pickles as before.
"""

from __future__ import annotations

import threading
import weakref

from torch import nn

_TURNS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_GUARD = threading.Lock()


def model_turn(model: nn.Module) -> threading.RLock:
    """The lock of ``model``'s turn: ``with model_turn(model): ...``."""
    key = model.get_decoder() if hasattr(model, "get_decoder") else model
    with _GUARD:
        lock = _TURNS.get(key)
        if lock is None:
            lock = _TURNS[key] = threading.RLock()
        return lock
