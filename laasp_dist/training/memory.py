"""Peak memory of this process over a phase (an epoch, a pruning round).

- GPU: ``torch.cuda.max_memory_allocated`` since ``torch.cuda.reset_peak_memory_stats`` —
  tensors only, not the caching allocator's reserve or the CUDA context.
- CPU (Linux): the peak resident set size, ``VmHWM`` in ``/proc/self/status``, reset by
  writing ``5`` to ``/proc/self/clear_refs`` at the start of the phase. Where that reset is
  refused (another OS, a locked-down /proc), the peak since the process started
  (``getrusage``'s ``ru_maxrss``) is reported instead, and `measure` says so.
"""

from __future__ import annotations

import resource
from pathlib import Path

import torch

MIB = 1 << 20


class PeakMemory:
    """`reset()` at the start of a phase, `peak_bytes()` at its end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.gpu = device.type == "cuda"
        self.resettable = True

    @property
    def measure(self) -> str:
        if self.gpu:
            return "cuda max_memory_allocated"
        return "peak RSS (VmHWM)" if self.resettable else "peak RSS since process start (ru_maxrss)"

    def reset(self) -> None:
        if self.gpu:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.resettable = False

    def peak_bytes(self) -> int:
        if self.gpu:
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.resettable:
            try:
                for line in Path("/proc/self/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
            except OSError:
                pass
            self.resettable = False
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
