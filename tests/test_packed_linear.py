"""hierkern::packed_linear (the generation loops' small-row linear layers, hierkern/models/_linear.py)
against a float64 reference: shapes off every tile (rows off the 6-row blocks and the 96-row tiles,
out_features off the 16-column panels, in_features past the 256-deep panel passes), bias, the tanh GELU,
the residual, strided rows; bad input; opcheck; the Linear wrapper's choice of path."""
import pytest
import torch
import torch.nn.functional as F

from hierkern import _backend
from hierkern.models import _linear
from hierkern.testing import assert_close_rel, poisoned_outputs

pytestmark = pytest.mark.skipif(not _backend.has_compiled_ops(), reason="hierkern._C not built")


def _op(x, w, bias=None, gelu=False, residual=None):
    packed = torch.ops.hierkern.pack_linear_weight(w)
    return torch.ops.hierkern.packed_linear(x, packed, w.shape[0], bias, gelu, residual)


def _ref(x, w, bias, gelu, residual):
    y = F.linear(x, w, bias)
    if gelu:
        y = _linear.gelu_tanh_reference(y)
    return y if residual is None else residual + y


@pytest.mark.parametrize("rows,k,n", [(1, 7, 1), (5, 128, 16), (32, 128, 256), (37, 300, 130), (97, 64, 17),
                                      (200, 33, 48)])
@pytest.mark.parametrize("bias,gelu,residual", [(False, False, False), (True, False, False), (True, True, False),
                                                (True, False, True), (False, True, True)])
def test_matches_float64_reference(rows, k, n, bias, gelu, residual):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(2, rows, k, generator=g)[1:]  # batch 1, a view into a larger buffer
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    r = torch.randn(1, rows, n, generator=g) if residual else None
    with poisoned_outputs():
        out = _op(x, w, b, gelu, r)
    d = lambda t: None if t is None else t.double()
    ref64 = _ref(d(x), d(w), d(b), gelu, d(r))
    ref32 = _ref(x, w, b, gelu, r) if not gelu else _ref(x, w, b, False, None)
    if gelu:  # the float32 eager result of the same formula (F.gelu's tanh rounding)
        ref32 = F.gelu(ref32, approximate="tanh") + (0 if r is None else r)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_close_rel("packed_linear", out, ref64, ref32)


def test_strided_rows_and_size_one_dims_read_in_place():
    # rows of a column slice (row stride 40 > in_features 24) and a leading size-1 dimension with an
    # arbitrary stride; the result equals the contiguous input's
    base = torch.randn(3, 1, 9, 40)
    x = base[:, :, :, 8:32]
    w, b = torch.randn(20, 24), torch.randn(20)
    out = _op(x, w, b, True, None)
    torch.testing.assert_close(out, _op(x.contiguous(), w, b, True, None), rtol=0, atol=0)
    assert out.shape == (3, 1, 9, 20)
    assert _op(torch.randn(24), w).shape == (20,)  # one vector
    assert _op(torch.randn(0, 24), w, b).shape == (0, 20)


def test_bad_input_names_the_argument():
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    p = torch.ops.hierkern.pack_linear_weight(w)
    pl = torch.ops.hierkern.packed_linear
    cases = [
        (lambda: pl(x.double(), p, 16, None, False, None), "x must be float32"),
        (lambda: pl(torch.randn(8, 4).t(), p, 16, None, False, None), "x must have a unit-stride last dimension"),
        (lambda: pl(torch.randn(4, 3, 8).transpose(0, 1), p, 16, None, False, None), "x must view as"),
        (lambda: pl(x, p, 17, None, False, None), "packed must be pack_linear_weight"),
        (lambda: pl(torch.randn(4, 9), p, 16, None, False, None), "packed must be pack_linear_weight"),
        (lambda: pl(x, p, 16, torch.randn(15), False, None), "bias must be (out_features,)"),
        (lambda: pl(x, p, 16, torch.randn(16).half(), False, None), "bias must be float32"),
        (lambda: pl(x, p, 16, None, False, torch.randn(4, 15)), "residual must have the output's shape"),
        (lambda: pl(x, p, 0, None, False, None), "out_features must be >= 1"),
        (lambda: torch.ops.hierkern.pack_linear_weight(torch.randn(2, 3, 4)), "weight must be 2-D"),
        (lambda: torch.ops.hierkern.pack_linear_weight(w.bfloat16()), "weight must be float32"),
    ]
    for call, msg in cases:
        with pytest.raises(RuntimeError, match=msg.replace("(", r"\(").replace(")", r"\)")):
            call()


def test_opcheck():
    x, w, b, r = torch.randn(2, 5, 24), torch.randn(20, 24), torch.randn(20), torch.randn(2, 5, 20)
    torch.library.opcheck(torch.ops.hierkern.pack_linear_weight.default, (w,))
    p = torch.ops.hierkern.pack_linear_weight(w)
    torch.library.opcheck(torch.ops.hierkern.packed_linear.default, (x, p, 20, b, True, r))


def test_linear_takes_the_packed_path_only_for_small_row_blocks_without_grad(monkeypatch):
    calls = []
    real = torch.ops.hierkern.packed_linear
    monkeypatch.setattr(_linear.torch.ops.hierkern, "packed_linear",
                        lambda *a: calls.append(a[0].shape) or real(*a), raising=False)
    w = torch.randn(16, 8, requires_grad=True)
    lin = _linear.Linear(w, None)
    small, big = torch.randn(1, _linear.ROWS_MAX, 8), torch.randn(1, _linear.ROWS_MAX + 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(lin(small, gelu=True), F.gelu(F.linear(small, w), approximate="tanh"))
        lin(big)
    lin(small)  # grad mode: the op has no backward, so BLAS
    assert calls == [small.shape]
    assert _linear.Linear(w.double(), None).packed is None  # float64: never packed
