"""hotloop's internals shared by the ops: argument checks, tensor layouts, buffers, the gradient-in-forward op,
the compiled extension's loader and the backend dispatcher. Nothing here is public API."""
