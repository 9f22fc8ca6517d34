"""The quantization primitives (kernels/kv_quant.py): packing round trips, error bounds, edge rows."""

import pytest
import torch

from kvchat_kernels.kv_quant import dequantize, grouped, minmax, minmax_zero, pack, unpack, unpack_dequantize


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_layout_is_little_end_first():
    # code j of a byte sits in bits [j * bits, (j + 1) * bits): the kernel unpacks with (byte >> j*bits) & mask
    assert pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack(torch.tensor([[7, 12]], dtype=torch.uint8), 4).tolist() == [[7 | 12 << 4]]


def test_pack_refuses_codes_that_do_not_fill_bytes():
    with pytest.raises(ValueError, match="do not fill whole bytes"):
        pack(torch.zeros(1, 6, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(1, 6, dtype=torch.uint8), 3)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 32, 64, generator=g)
    x[:, :, 5] *= 20  # an outlier channel, as keys have
    x[2] += 3.0  # a group whose values share a sign
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [1, -1])
def test_minmax_error_is_half_a_step(bits, dim):
    x = _data(bits)
    codes, scale, mn = minmax(x, bits, dim)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= (1 << bits) - 1
    assert scale.dtype == mn.dtype == torch.float16
    err = (dequantize(codes, scale, mn) - x).abs()
    # half a step, plus float16 rounding of the minimum and of the codes' reconstruction
    bound = scale.float() / 2 + mn.float().abs() * 2**-10 + 1e-6
    assert bool((err <= bound).all()), f"max err {err.max():.3e}, mean {err.mean():.3e}"


@pytest.mark.parametrize("bits", [4, 8])
def test_minmax_zero_error_is_one_step_and_zero_is_a_code(bits):
    x = grouped(_data(bits), 16)
    codes, scale, zero = minmax_zero(x, bits, -1)
    assert zero.dtype == torch.uint8 and scale.dtype == torch.float16
    err = (dequantize(codes, scale, zero) - x).abs()
    assert bool((err <= scale.float() + 1e-6).all()), f"max err {err.max():.3e}"
    assert float(dequantize(zero, scale, zero).abs().max()) == 0.0  # 0 is represented exactly


def test_minmax_zero_does_not_saturate_a_row_of_one_sign():
    # AWQ's zero = clamp(-round(min / scale), 0, qmax) saturates rows in [10, 11] at 255 * scale ~ 1.1
    x = 10 + torch.rand(1, 64, generator=torch.Generator().manual_seed(0))
    codes, scale, zero = minmax_zero(x, 8, -1)
    assert (dequantize(codes, scale, zero) - x).abs().max() <= scale.float().max()


def test_constant_rows_and_masked_rows():
    x = torch.full((1, 8, 4), 1.25)
    codes, scale, mn = minmax(x, 4, 1)
    assert torch.equal(dequantize(codes, scale, mn), x)  # scale 0: exact, no NaN
    y = torch.randn(1, 8, 4)
    y[0, 5:] = 1000.0  # padding rows of a partial group
    valid = (torch.arange(8) < 5).view(1, 8, 1)
    codes, scale, mn = minmax(y, 4, 1, valid=valid)
    err = (dequantize(codes, scale, mn) - y)[0, :5].abs()
    assert err.max() <= scale.float().max() / 2 + 1e-3  # the padding did not stretch the range


def test_float16_overflow_is_clamped():
    x = torch.tensor([[[-1e6], [0.0], [1e6]]])
    codes, scale, mn = minmax(x, 8, 1)
    assert torch.isfinite(scale.float()).all() and torch.isfinite(mn.float()).all()


def test_unpack_dequantize_layouts():
    x = _data(3)  # (N, T, D)
    codes, scale, mn = minmax(x, 4, dim=1)  # per channel over T: scale (N, 1, D)
    got = unpack_dequantize(pack(codes, 4), scale[:, 0], mn[:, 0], 4)
    assert torch.equal(got, dequantize(codes, scale, mn))
    codes, scale, mn = minmax(grouped(x, 16), 4, dim=-1)  # per token, 16 channels: (N, T, 4, 1)
    got = unpack_dequantize(pack(codes.view(x.shape), 4), scale[..., 0], mn[..., 0], 4)
    assert torch.equal(got, dequantize(codes, scale, mn).view(x.shape))
