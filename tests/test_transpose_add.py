"""hotloop::transpose_add_cpu, the tiled transpose(-add) behind the CPU fused linear paths' bf16 d_weight tiles."""
import pytest
import torch

import hotloop  # noqa: F401  (loads the ops)

PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float16), (torch.float32, torch.bfloat16), (torch.float32, torch.float16)]


@pytest.mark.parametrize("dst_dtype,src_dtype", PAIRS)
@pytest.mark.parametrize("accumulate", [False, True])
def test_against_torch(dst_dtype, src_dtype, accumulate):
    rows, cols = 130, 67  # not multiples of the 64-element tile
    src_full = torch.randn(cols, rows + 5).to(src_dtype)
    src = src_full[:, 3:3 + rows]  # a row stride that is not the width
    dst_full = torch.randn(rows, cols + 9).to(dst_dtype)
    dst = dst_full[:, :cols]
    before, outside = dst.clone(), dst_full[:, cols:].clone()
    hotloop._C.cpu.transpose_add(dst, src, accumulate)
    want = src.t().double() + (before.double() if accumulate else 0)
    if dst_dtype == torch.float64 or not accumulate:
        assert torch.equal(dst, want.to(dst_dtype))
    else:  # the sum is formed in float32 and rounded once
        assert torch.equal(dst, (src.t().float() + before.float()).to(dst_dtype))
    assert torch.equal(dst_full[:, cols:], outside)  # nothing written past the view


def test_errors():
    with pytest.raises(TypeError, match="`src` must have `dst`'s dtype"):
        hotloop._C.cpu.transpose_add(torch.zeros(3, 2, dtype=torch.bfloat16), torch.zeros(2, 3), False)
    with pytest.raises(ValueError, match=r"`dst` \[r, c\] and `src` \[c, r\] expected"):
        hotloop._C.cpu.transpose_add(torch.zeros(3, 2), torch.zeros(3, 2), False)
    with pytest.raises(ValueError, match="unit stride"):
        hotloop._C.cpu.transpose_add(torch.zeros(2, 3).t(), torch.zeros(2, 3), False)
