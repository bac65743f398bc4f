"""Ctrl-C as a request to stop at the next step boundary (after a checkpoint)."""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


class GracefulInterrupt:
    """Turn the first Ctrl-C (SIGINT) into a request to stop at the next step boundary.

    The trainer checks :meth:`requested` after every optimizer step, saves a checkpoint and raises
    :class:`KeyboardInterrupt`, so an interrupted run resumes exactly where it stopped. A second
    Ctrl-C aborts at once (the last checkpoint still resumes). Outside the main thread signals
    cannot be caught and this does nothing.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self._flag = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self._flag:
            raise KeyboardInterrupt
        self._flag = True
        self.accelerator.print("\naha train: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def requested(self) -> bool:
        """True when any process got a Ctrl-C (a collective call when several processes run)."""
        if self.accelerator.num_processes == 1:
            return self._flag
        flag = torch.tensor([float(self._flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item())
