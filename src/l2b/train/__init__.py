"""The one trainer: ``train(cfg)`` writes a run folder; ``--resume`` continues it bit-identically on CPU.

``loop`` reads top to bottom (set-up, epochs, steps, evaluation, outputs); ``setup`` builds a run,
``state`` holds what a checkpoint carries, ``update`` the shared optimizer step, ``outputs`` the run
folder, ``checkpoint`` the atomic writes and safe reads, ``distributed`` the data-parallel set-up.
"""

from .loop import train
from .update import cosine_lr, evaluate, fit_ce, optimizer_step

__all__ = ["train", "cosine_lr", "evaluate", "fit_ce", "optimizer_step"]
