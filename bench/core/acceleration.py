"""The optional speed-ups of an attack's optimization step, as a value that is passed, not set.

The worker (``leakbench.running.worker``) holds one ``Acceleration`` and hands it to every
attack it builds (``Attack.acceleration``); an attack passes it on to the optimization core
(``leakbench.attacks.optimize``). Nothing reads it from process-global state, so two audits in
one process (a notebook, a test) run with their own settings. The one exception is torch's own:
TensorFloat-32 is a switch of torch's backends, which ``apply_backend_flags`` sets and
``backend_flags`` / ``restore_backend_flags`` save and restore around a run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Literal

import torch


@dataclass(frozen=True)
class Acceleration:
    """Optional speed-ups of the optimization step, off by default; each must keep results
    within tolerance of plain fp32 (tests/unit/test_packing.py checks what runs on a CPU).

    - ``compile``: ``torch.compile`` of the vectorized step; ``"reduce-overhead"`` also
      captures CUDA graphs on a GPU. Compilation costs seconds per new pack shape: it pays
      off for long attacks, not for smoke runs. ``"auto"`` lets the runner decide per pack
      (``leakbench.running.sizing.PackSizer.compile_choice``: compiled only where a probe
      shows it repays its compilation); an attack handed ``"auto"`` unresolved runs eager.
    - ``tf32``: TensorFloat-32 matmuls and convolutions on Ampere+ GPUs (no effect on a CPU).
    - ``channels_last``: the attacker's 4-D weights and the candidates (every 5-D state
      tensor, rows × batch × C × H × W) laid out channels-last, the layout tensor-core
      convolutions prefer; values are unchanged, only strides. On a CPU it was slower
      (README, "Execution").
    """

    compile: Literal["off", "auto", "default", "reduce-overhead", "max-autotune"] = "off"
    tf32: bool = False
    channels_last: bool = False

    def describe(self) -> dict:
        """What differs from the defaults, for a row's execution record (empty when nothing does)."""
        default = Acceleration()
        return {k: getattr(self, k) for k in ("compile", "tf32", "channels_last")
                if getattr(self, k) != getattr(default, k)}

    def apply_backend_flags(self) -> None:
        """Set torch's TensorFloat-32 switches (process-wide in torch) to ``tf32``."""
        torch.backends.cuda.matmul.allow_tf32 = self.tf32
        torch.backends.cudnn.allow_tf32 = self.tf32

    @property
    def compiles(self) -> bool:
        """Whether the step is compiled (``"auto"`` not yet resolved by the runner counts as eager)."""
        return self.compile not in ("off", "auto")

    def with_compile(self, compile: str) -> "Acceleration":
        """The same settings with ``compile`` replaced (the runner's resolution of ``"auto"``)."""
        return replace(self, compile=compile)

    def wrap(self, step: Callable) -> Callable:
        """``step`` compiled when ``compile`` asks for it, else ``step`` itself."""
        if not self.compiles:
            return step
        return torch.compile(step, mode=None if self.compile == "default" else self.compile, dynamic=False)

    def lay_out(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in this setting's memory layout: channels-last strides for 4-D and 5-D tensors
        (the last three dimensions C, H, W) when ``channels_last``; else ``t``."""
        if not self.channels_last or t.dim() not in (4, 5):
            return t
        if t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


#: Plain fp32, no compilation, default layout: what an attack uses unless it is handed another.
NO_ACCELERATION = Acceleration()


def backend_flags() -> tuple[bool, bool]:
    """torch's TensorFloat-32 switches as they are now (matmul, cuDNN)."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def restore_backend_flags(flags: tuple[bool, bool]) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
