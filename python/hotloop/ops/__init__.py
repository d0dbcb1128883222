"""Public ops: validation, backend dispatch and the torch.library custom ops (fake + autograd) around the kernels."""
