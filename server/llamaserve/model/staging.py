"""Step inputs on their way to the device: written on the host into one persistent buffer (pinned on CUDA, so
that the copy is asynchronous), sent in one non-blocking copy per step, and read on the device as typed views.

    staging.begin()                                  # a new step: the buffer is written from its start
    ids = staging.put(token_ids)                     # int64 by default; any list, numpy array or CPU tensor
    table, rows = staging.reserve((4, 8))            # a zeroed field to fill in place through a numpy view
    staging.send()                                   # one host-to-device copy, non-blocking
    ids.tensor(), table.tensor()                     # device views, valid until the next begin()

On the CPU the host buffer is the device buffer: nothing is copied. On CUDA, `begin` waits until the previous
step's copy has read the host memory (an event, not a device synchronisation), since the host may run a
whole step ahead of the device.
"""

import numpy as np
import torch

ALIGN = 16  # bytes: every field starts where any dtype may view it
NUMPY_DTYPES = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


class Staged:
    """One field of a StagingBuffer; its device tensor once the buffer is sent."""

    __slots__ = ("buffer", "start", "nbytes", "dtype", "shape")

    def __init__(self, buffer: "StagingBuffer", start: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
        self.buffer, self.start, self.nbytes, self.dtype, self.shape = buffer, start, nbytes, dtype, shape

    def tensor(self) -> torch.Tensor:
        return self.buffer.device_bytes[self.start : self.start + self.nbytes].view(self.dtype).view(self.shape)


class StagingBuffer:
    def __init__(self, device: torch.device | str, capacity: int = 1 << 16):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._sent = torch.cuda.Event() if self.cuda else None
        self._allocate(capacity)
        self.offset = 0

    def _allocate(self, capacity: int) -> None:
        self.host_bytes = torch.zeros(capacity, dtype=torch.uint8, pin_memory=self.cuda)  # [capacity]
        self.host = self.host_bytes.numpy()
        self.device_bytes = torch.empty(capacity, dtype=torch.uint8, device=self.device) if self.cuda \
            else self.host_bytes

    @property
    def capacity(self) -> int:
        return self.host_bytes.numel()

    def begin(self) -> "StagingBuffer":
        if self._sent is not None:
            self._sent.synchronize()
        self.offset = 0
        return self

    def _claim(self, nbytes: int) -> int:
        start = -(-self.offset // ALIGN) * ALIGN
        if start + nbytes > self.capacity:  # rare: a step larger than any before (a long logit_bias, many rebuilds)
            old = self.host_bytes
            self._allocate(max(2 * self.capacity, start + nbytes))
            self.host_bytes[: self.offset].copy_(old[: self.offset])  # nothing is sent before `send`
        self.offset = start + nbytes
        return start

    def reserve(self, shape: tuple[int, ...], dtype: torch.dtype = torch.int64) -> tuple[Staged, np.ndarray]:
        """A zeroed field of `shape`, and the numpy view of it to write in place."""
        np_dtype = NUMPY_DTYPES[dtype]
        nbytes = int(np.prod(shape)) * np.dtype(np_dtype).itemsize
        start = self._claim(nbytes)
        view = self.host[start : start + nbytes].view(np_dtype).reshape(shape)
        view.fill(0)
        return Staged(self, start, nbytes, dtype, tuple(shape)), view

    def put(self, values, dtype: torch.dtype = torch.int64) -> Staged:
        """A field holding `values` (its shape theirs)."""
        if isinstance(values, torch.Tensor):
            values = values.numpy()
        array = np.ascontiguousarray(values, dtype=NUMPY_DTYPES[dtype])
        start = self._claim(array.nbytes)
        self.host[start : start + array.nbytes] = array.reshape(-1).view(np.uint8)
        return Staged(self, start, array.nbytes, dtype, array.shape)

    def send(self) -> None:
        """Everything put since `begin` to the device, in one non-blocking copy."""
        if self.cuda and self.offset:
            self.device_bytes[: self.offset].copy_(self.host_bytes[: self.offset], non_blocking=True)
            self._sent.record()
