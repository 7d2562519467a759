"""A step's integer inputs (token ids, positions, cache places, logits rows, attention tiles)
uploaded to the device in one copy per dtype, not one synchronous copy per tensor.

The arrays are packed side by side into a host buffer, pinned on CUDA so that the copy is
asynchronous, and copied into a device buffer whose slices are the step's tensors. The host
buffer is written again only once the previous copy has read it (an event); the device buffer
is overwritten by the next step's copy, which the stream orders after this step's kernels. Both
buffers grow (doubling) to the largest step seen, so a steady load allocates nothing per step,
and the tensors of a step are views at fixed addresses as long as no step outgrows them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class Uploader:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pinned = device.type == "cuda"
        self._host: dict[torch.dtype, torch.Tensor] = {}
        self._device: dict[torch.dtype, torch.Tensor] = {}
        self._read: dict[torch.dtype, torch.cuda.Event] = {}
        self.copies = 0  # host-to-device copies made (for tests)

    def put(
        self, dtype: torch.dtype, arrays: Sequence[Sequence[int] | np.ndarray]
    ) -> list[torch.Tensor]:
        """The arrays as `dtype` tensors on the device, in one copy: views of the device
        buffer, valid until the next `put` of this dtype."""
        sizes = [len(a) for a in arrays]
        total = sum(sizes)
        host, dev = self._buffers(dtype, total)
        event = self._read.get(dtype)
        if event is not None:
            event.synchronize()  # the last copy has read the host buffer
        if total:
            packed = np.concatenate([np.asarray(a) for a in arrays])
            host[:total].numpy()[:] = packed  # a host copy, no dispatch per element
            dev[:total].copy_(host[:total], non_blocking=self._pinned)
            self.copies += 1
            if self._pinned:
                event = self._read.setdefault(dtype, torch.cuda.Event())
                event.record()
        return list(dev[:total].split(sizes))

    def _buffers(self, dtype: torch.dtype, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        host = self._host.get(dtype)
        if host is None or host.numel() < total:
            size = max(total, 2 * (host.numel() if host is not None else 256))
            event = self._read.get(dtype)
            if event is not None:
                event.synchronize()  # the old buffer may still be read
            host = torch.empty(size, dtype=dtype, pin_memory=self._pinned)
            self._host[dtype] = host
            self._device[dtype] = torch.empty(size, dtype=dtype, device=self.device)
        return host, self._device[dtype]
