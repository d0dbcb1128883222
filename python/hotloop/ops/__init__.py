"""Public ops: validation, the torch.library custom ops (fake kernels + autograd) each op declares once, and the
kernels each registers with the dispatcher (hotloop._internal.dispatch)."""
