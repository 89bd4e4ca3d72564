"""A guard against reading a tensor's value on the host: on a GPU each such read makes the
host wait for the device, and a CUDA graph capture cannot contain one."""

from torch.utils._python_dispatch import TorchDispatchMode


class NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a tensor's value on the host."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select", "unique_consecutive", "_unique2"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in self.SYNCING:
            raise AssertionError(f"{func.__name__} reads a tensor on the host")
        return func(*args, **(kwargs or {}))
