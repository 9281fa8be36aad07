"""hierkern::packed_linear (the generation loops' small-row linear layers, hierkern/models/_linear.py)
against a float64 reference: shapes off every tile (rows off the 6-row blocks and the 96-row tiles,
out_features off the 16-column panels, in_features past the 256-deep panel passes), bias, the tanh GELU,
the residual, the pre-norm, strided and batch-sliced rows; bad input; opcheck; the Linear wrapper's
choice of path."""
import pytest
import torch
import torch.nn.functional as F

from hierkern import _backend
from hierkern.models import _linear
from hierkern.testing import assert_close_rel, poisoned_outputs

pytestmark = pytest.mark.skipif(not _backend.has_compiled_ops(), reason="hierkern._C not built")


def _op(x, w, bias=None, gelu=False, residual=None, norm=None):
    packed = torch.ops.hierkern.pack_linear_weight(w)
    nw, nb, eps = norm if norm is not None else (None, None, 0.0)
    return torch.ops.hierkern.packed_linear(x, packed, w.shape[0], bias, gelu, residual, nw, nb, eps)


def _ref(x, w, bias, gelu, residual, norm=None):
    if norm is not None:
        x = F.layer_norm(x, (x.shape[-1],), *norm)
    y = F.linear(x, w, bias)
    if gelu:
        y = F.gelu(y, approximate="tanh")  # in y's dtype: float64 for the reference
    return y if residual is None else residual + y


@pytest.mark.parametrize("rows,k,n", [(1, 7, 1), (5, 128, 16), (32, 128, 256), (37, 300, 130), (97, 64, 17),
                                      (200, 33, 48)])
@pytest.mark.parametrize("bias,gelu,residual,norm", [(False, False, False, None), (True, False, False, None),
                                                     (True, True, False, None), (True, False, True, None),
                                                     (False, True, True, None), (True, False, True, "affine"),
                                                     (True, True, False, "weight")])
def test_matches_float64_reference(rows, k, n, bias, gelu, residual, norm):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(2, rows, k, generator=g)[1:] * 3 + 1  # batch 1, a view into a larger buffer
    w = torch.randn(n, k, generator=g) / k ** 0.5
    b = torch.randn(n, generator=g) if bias else None
    r = torch.randn(1, rows, n, generator=g) if residual else None
    nrm = None
    if norm is not None:
        nrm = (torch.randn(k, generator=g), torch.randn(k, generator=g) if norm == "affine" else None, 1e-5)
    with poisoned_outputs():
        out = _op(x, w, b, gelu, r, nrm)
    d = lambda t: None if t is None or isinstance(t, float) else t.double()
    ref64 = _ref(d(x), d(w), d(b), gelu, d(r), None if nrm is None else (d(nrm[0]), d(nrm[1]), nrm[2]))
    if gelu:  # the float32 eager result: F.gelu's tanh rounding
        ref32 = F.gelu(_ref(x, w, b, False, None, nrm), approximate="tanh") + (0 if r is None else r)
    else:
        ref32 = _ref(x, w, b, False, r, nrm)
    assert out.dtype == torch.float32 and out.is_contiguous()
    assert_close_rel("packed_linear", out, ref64, ref32)


def test_strided_and_batch_sliced_rows_read_in_place():
    # rows of a column slice (row stride 40 > in_features 24), a leading size-1 dimension with an
    # arbitrary stride, and a slice of every sequence of a batch (x[:, 2:7]: not one evenly strided
    # matrix) as x and as the residual; each result equals the contiguous input's
    w, b = torch.randn(20, 24), torch.randn(20)
    base = torch.randn(3, 1, 9, 40)
    x = base[:, :, :, 8:32]
    out = _op(x, w, b, True, None)
    torch.testing.assert_close(out, _op(x.contiguous(), w, b, True, None), rtol=0, atol=0)
    assert out.shape == (3, 1, 9, 20)
    xs, rs = torch.randn(2, 9, 24)[:, 2:7], torch.randn(2, 9, 20)[:, 1:6]
    norm = (torch.randn(24), torch.randn(24), 1e-5)
    for nrm in (None, norm):
        got = _op(xs, w, b, False, rs, nrm)
        torch.testing.assert_close(got, _op(xs.contiguous(), w, b, False, rs.contiguous(), nrm), rtol=0, atol=0)
    assert _op(torch.randn(24), w).shape == (20,)  # one vector
    assert _op(torch.randn(0, 24), w, b).shape == (0, 20)


def test_bad_input_names_the_argument():
    x, w = torch.randn(4, 8), torch.randn(16, 8)
    p = torch.ops.hierkern.pack_linear_weight(w)
    pl = lambda x, p, n, b, g, r, nw=None, nb=None: torch.ops.hierkern.packed_linear(x, p, n, b, g, r, nw, nb, 1e-5)
    cases = [
        (lambda: pl(x.double(), p, 16, None, False, None), "x must be float32"),
        (lambda: pl(torch.randn(8, 4).t(), p, 16, None, False, None), "x must have a unit-stride last dimension"),
        (lambda: pl(x, p, 17, None, False, None), "packed must be pack_linear_weight"),
        (lambda: pl(torch.randn(4, 9), p, 16, None, False, None), "packed must be pack_linear_weight"),
        (lambda: pl(x, p, 16, torch.randn(15), False, None), "bias must be (out_features,)"),
        (lambda: pl(x, p, 16, torch.randn(16).half(), False, None), "bias must be float32"),
        (lambda: pl(x, p, 16, None, False, torch.randn(4, 15)), "residual must have the output's shape"),
        (lambda: pl(x, p, 16, None, False, torch.randn(16, 4).t()), "residual must have a unit-stride"),
        (lambda: pl(x, p, 16, None, False, None, torch.randn(7)), "norm_weight must be (in_features,)"),
        (lambda: pl(x, p, 16, None, False, None, torch.randn(8), torch.randn(8).double()), "norm_bias must be float32"),
        (lambda: pl(x, p, 16, None, False, None, None, torch.randn(8)), "norm_bias needs norm_weight"),
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
    nw, nb = torch.randn(24), torch.randn(24)
    torch.library.opcheck(torch.ops.hierkern.packed_linear.default, (x, p, 20, b, True, r, nw, nb, 1e-5))
    torch.library.opcheck(torch.ops.hierkern.packed_linear.default, (x[:, 1:4], p, 20, None, False, None, None, None,
                                                                     0.0))


def test_linear_takes_the_packed_path_only_for_small_row_blocks_without_grad(monkeypatch):
    calls = []
    real = _linear._packed_linear
    monkeypatch.setattr(_linear, "_packed_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    w = torch.randn(16, 8, requires_grad=True)
    lin = _linear.Linear(w, None)
    small, big = torch.randn(1, _linear.ROWS_MAX, 8), torch.randn(1, _linear.ROWS_MAX + 1, 8)
    with torch.no_grad():
        torch.testing.assert_close(lin(small, gelu=True), F.gelu(F.linear(small, w), approximate="tanh"))
        norm = (torch.randn(8), torch.randn(8), 1e-5)
        torch.testing.assert_close(lin(small, norm=norm), F.linear(F.layer_norm(small, (8,), *norm), w))
        lin(big)
    lin(small)  # grad mode: the op has no backward, so BLAS
    assert calls == [small.shape, small.shape]
    assert _linear.Linear(w.double(), None).packed is None  # float64: never packed
