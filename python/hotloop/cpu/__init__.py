"""CPU kernels composed in Python from BLAS matmuls and the C++ kernels of hotloop._C.cpu: the tile engine of the
fused linear ops (tile_engine, vocab_tiles) and the kernels registered from it."""
