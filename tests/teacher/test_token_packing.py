"""Bit packing and value codes of the top-k token cache (kdistill.teacher.cache.bitpack)."""

import math

import numpy as np
import pytest
import torch

from kdistill.teacher.cache.bitpack import (CURVE_TERMS, bits_for, curve_basis, dequantize_between, eval_curve,
                                            fit_curve, max_quantization_error, pack_bits, packed_bytes,
                                            quantize_between, unpack_bits)
from kdistill.teacher.cache.format import (check_token_values, decode_token_rows, encode_token_rows, token_layout,
                                           token_row_bytes)


@pytest.mark.parametrize("vocab, bits", [(1, 1), (2, 1), (3, 2), (256, 8), (257, 9), (300, 9), (2048, 11),
                                         (2049, 12), (151936, 18), (2**32, 32)])
def test_bits_for(vocab, bits):
    assert bits_for(vocab) == bits
    assert (vocab - 1) < 2**bits  # every id fits


@pytest.mark.parametrize("vocab", [2, 3, 300, 2048, 151936, 2**32])
@pytest.mark.parametrize("n", [1, 5, 64])
def test_pack_round_trip(vocab, n):
    bits = bits_for(vocab)
    rng = np.random.default_rng(vocab % 1000 + n)
    values = rng.integers(0, vocab, size=(7, n), dtype=np.int64)
    values[0] = vocab - 1  # the largest id, every bit set for a power of two
    values[1] = 0
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.shape == (7, packed_bytes(n, bits)) == (7, -(-n * bits // 8))
    assert np.array_equal(unpack_bits(packed, bits, n), values)
    # rows are independent: a row unpacked alone (as a memmap row read is) gives its values
    assert np.array_equal(unpack_bits(packed[3:4], bits, n), values[3:4])
    assert np.array_equal(unpack_bits(packed[[5, 2]], bits, n), values[[5, 2]])


def test_pack_layout_and_torch_input():
    # 11-bit fields, least significant bit first: 2047 then 1 -> bits 0..10 set, bit 11 set
    packed = pack_bits(torch.tensor([[2047, 1]]), 11)
    assert packed.tolist() == [[0xFF, 0x0F, 0x00]]
    assert unpack_bits(packed, 11, 2).tolist() == [[2047, 1]]
    assert unpack_bits(np.zeros((0, 3), np.uint8), 11, 2).shape == (0, 2)


def test_pack_refuses_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 2048\)"):
        pack_bits(np.array([[2048]]), 11)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_bits(np.array([[-1]]), 2)
    with pytest.raises(ValueError, match="bits must be"):
        pack_bits(np.array([[1]]), 33)
    with pytest.raises(ValueError, match="shape"):
        unpack_bits(np.zeros((2, 3), np.uint8), 11, 3)


def sorted_logprobs(p=50, v=500, k=40, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(torch.randn(p, v, generator=g, dtype=torch.float64) * scale, -1)
    return lp.topk(k, dim=-1).values


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 12])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantization_error_within_bound(bits, dtype):
    lp = sorted_logprobs()
    top = lp[:, 0].to(dtype).double()  # as stored: the last exact value
    rest = lp[:, 1:]
    codes, low = quantize_between(rest, top, bits, dtype)
    assert codes.dtype == np.uint32 and int(codes.max()) <= 2**bits - 1 and low.dtype == dtype
    decoded = dequantize_between(codes, top, low, bits).double()
    err = (decoded - rest).abs().amax(-1)
    bound = max_quantization_error(top, low, bits, dtype)
    assert torch.all(err <= bound + 1e-6), (err - bound).max()
    # the bound is the grid's half step (plus rounding), and it is nearly reached
    step = (top - low.double()) / (2**bits - 1)
    assert torch.all(bound >= step / 2)
    if bits >= 2:
        assert float(err.max()) > 0.3 * float((step / 2).max())
    # codes are monotone in the (descending) values, and the ends of the grid are reachable
    assert np.all(np.diff(codes.astype(np.int64), axis=1) >= 0)


def test_quantization_more_bits_less_error_and_edge_rows():
    lp = sorted_logprobs(seed=3)
    top = lp[:, 0].half().double()
    errs = []
    for bits in (2, 4, 6, 8):
        codes, low = quantize_between(lp[:, 1:], top, bits)
        errs.append(float((dequantize_between(codes, top, low, bits).double() - lp[:, 1:]).abs().max()))
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.02
    # a flat row (step 0) and a row holding -inf (a token given no mass) stay finite
    flat = torch.full((1, 5), -3.0, dtype=torch.float64)
    codes, low = quantize_between(flat, torch.tensor([-3.0], dtype=torch.float64), 4)
    assert codes.tolist() == [[0] * 5] and torch.equal(dequantize_between(codes, torch.tensor([-3.0]), low, 4),
                                                       torch.full((1, 5), -3.0))
    inf = torch.tensor([[-1.0, -2.0, -float("inf")]], dtype=torch.float64)
    codes, low = quantize_between(inf, torch.tensor([-1.0], dtype=torch.float64), 4)
    assert torch.isfinite(dequantize_between(codes, torch.tensor([-1.0]), low, 4)).all()


@pytest.mark.parametrize("n, terms", [(124, 7), (40, 4), (3, 5), (1, 3)])
def test_curve_basis_orthonormal_and_fixed(n, terms):
    b = curve_basis(n, terms)
    assert b.shape == (n, terms)
    nonzero = b.abs().sum(0) > 0
    assert int(nonzero.sum()) == min(n, terms)  # columns dependent on the ones before are zero
    gram = b.T @ b
    assert torch.allclose(gram, torch.diag(nonzero.double()), atol=1e-12)
    assert torch.equal(curve_basis(n, terms), b)
    # nested: a curve of fewer terms uses the first columns of a longer one
    assert torch.allclose(curve_basis(n, min(terms, 2)), b[:, :min(terms, 2)], atol=1e-15)


def test_curve_fit_exact_in_span_and_close_on_sorted_logprobs():
    n = 60
    t = torch.arange(n, dtype=torch.float64)
    x = t / (n - 1)
    rows = torch.stack([-2.0 - 3.0 * x.sqrt() - 1.5 * x, -0.5 - 4.0 * x.sqrt(), -1.0 - 2.0 * torch.log1p(t) / math.log(n)])
    coef = fit_curve(rows, 4, torch.float32)
    assert coef.dtype == torch.float32 and coef.shape == (3, 4)
    assert torch.allclose(eval_curve(coef, n).double(), rows, atol=1e-5)  # in the span: exact to float32
    coef16 = fit_curve(rows, 4)  # float16 coefficients: of the values' size, so rounding stays small
    assert coef16.dtype == torch.float16
    assert float((eval_curve(coef16, n).double() - rows).abs().max()) < 0.02
    lp = sorted_logprobs(k=64)[:, 4:]
    errs = [float((eval_curve(fit_curve(lp, m), lp.shape[1]).double() - lp).abs().mean()) for m in (1, 3, 6)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.08, errs
    assert len(CURVE_TERMS) == 7


@pytest.mark.parametrize("value_dtype, value_bits, exact_k, curve", [
    ("float16", None, None, None), ("bfloat16", None, None, None), ("float32", None, None, None),
    ("float16", 4, 4, None), ("float16", 2, 1, None), ("bfloat16", 3, 8, None), ("float32", 8, 40, None),
    ("float16", 16, 2, None), ("float16", None, 4, 5), ("float32", None, 1, 3), ("bfloat16", None, 39, 7)])
def test_rows_round_trip(value_dtype, value_bits, exact_k, curve):
    vocab, k = 300, 40
    g = torch.Generator().manual_seed(1)
    lp_full = torch.log_softmax(torch.randn(30, vocab, generator=g, dtype=torch.float64) * 3, -1)
    values, ids = lp_full.topk(k, dim=-1)
    tail = torch.logsumexp(lp_full.scatter(-1, ids, -float("inf")), -1)
    exact_k = check_token_values(k, value_dtype, value_bits, exact_k, curve)
    layout = token_layout(k, vocab, value_dtype, value_bits, exact_k, curve)
    arrays = encode_token_rows(ids, values, tail, vocab, value_dtype, value_bits, exact_k, curve)
    assert set(arrays) == set(layout)
    for fname, info in layout.items():
        assert arrays[fname].dtype.str == info["dtype"] and list(arrays[fname].shape[1:]) == info["shape"]
    # bytes per position: 9-bit ids, values, codes, the grid's low end, the tail
    vb = 4 if value_dtype == "float32" else 2
    exact = k if exact_k is None else exact_k
    rest = (0 if exact == k else curve * vb if curve is not None else -(-(k - exact) * value_bits // 8) + vb)
    assert token_row_bytes(layout) == sum(a[0].nbytes for a in arrays.values()) == 45 + exact * vb + rest + vb
    rows = np.array([4, 0, 29, 4])
    got_ids, got_lp, got_tail = decode_token_rows(arrays, rows, k, vocab, value_dtype, value_bits, exact_k, curve)
    assert torch.equal(got_ids, ids[rows])
    rel = {"float16": 2**-11, "bfloat16": 2**-8, "float32": 2**-24}[value_dtype]
    want = values[rows]
    assert torch.allclose(got_lp[:, :exact].double(), want[:, :exact], rtol=rel, atol=1e-6)
    if exact < k and curve is not None:
        tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[value_dtype]
        want_rest = eval_curve(fit_curve(want[:, exact:], curve, tdt), k - exact)
        assert torch.allclose(got_lp[:, exact:], want_rest, atol=1e-6)
    elif exact < k:
        top = got_lp[:, exact - 1].double()
        step = (top - want[:, -1]) / (2**value_bits - 1)
        slack = want.abs().amax(-1) * rel + 1e-5
        assert torch.all((got_lp[:, exact:].double() - want[:, exact:]).abs().amax(-1) <= step / 2 + slack)
    assert torch.allclose(got_tail.double(), tail[rows], rtol=rel, atol=1e-6)


def test_value_arguments_checked():
    assert check_token_values(64, "float16", None, None) is None
    assert check_token_values(64, "float16", 4, None) == 4
    assert check_token_values(2, "float16", 4, None) == 2
    with pytest.raises(ValueError, match="value_bits must be"):
        check_token_values(8, "float16", 0, None)
    with pytest.raises(ValueError, match="value_bits must be"):
        check_token_values(8, "float16", 17, None)
    with pytest.raises(ValueError, match="exact_k must be"):
        check_token_values(8, "float16", 4, 9)
    with pytest.raises(ValueError, match="exact_k applies to value codes or a curve only"):
        check_token_values(8, "float16", None, 2)
    assert check_token_values(8, "float16", None, None, 5) == 4
    with pytest.raises(ValueError, match="pass one of them"):
        check_token_values(8, "float16", 4, None, 5)
    with pytest.raises(ValueError, match="curve must be"):
        check_token_values(8, "float16", None, None, 8)
    with pytest.raises(ValueError, match="value_dtype must be"):
        check_token_values(8, "int8", 4, 2)
