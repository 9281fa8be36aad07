"""Approximate-KV-reuse primitives (refresh_select, scatter_kv, subset_attention) against the
reference, on every backend this machine can run, with outputs poisoned before the kernels run."""
import pytest
import torch

import hierkern
from hierkern.ops.kv_reuse import reference
from hierkern.testing import assert_close_rel, kernel_backends, make_qkv, poisoned_outputs

BACKENDS = [b for b in kernel_backends() if b[0] in ("cpu", "triton")]
INTERP = ("triton", "cpu")


def _dtypes(impl, device):
    # the interpreter has no bf16; the C++ kernels take every dtype
    return (torch.float32, torch.float16) if (impl, device) == INTERP else (torch.float32, torch.bfloat16,
                                                                            torch.float16)


def drifted(B, S, H, D, dtype, device, strided=False):
    """new, cached whose per-token similarities are well separated (token s drifts by a distinct
    amount), so the selection is the same in any accumulation order."""
    new = torch.randn(B, S, H, D)
    amount = torch.stack([torch.randperm(S) for _ in range(B)]).float() / max(S, 1) * 1.5 + 0.05
    cached = new + amount[:, :, None, None] * torch.randn(B, S, H, D)
    if strided:  # the V half of a fused (B, S, 2, H, D) projection, as a model produces it
        buf = torch.randn(B, S, 2, H, D)
        buf[:, :, 1] = new
        new = buf[:, :, 1]
    return new.to(device=device, dtype=dtype), cached.to(device=device, dtype=dtype)


def check_select(impl, device, new, cached, k):
    with poisoned_outputs():
        got = hierkern.refresh_select(new, cached, k, impl=impl)
    want = reference.refresh_select_reference(new.double(), cached.double(), k)
    assert got.dtype == torch.int64 and got.shape == (new.shape[0], k)
    assert torch.equal(got.cpu(), want.cpu()), (got, want)
    if k > 1:
        assert (got.diff(dim=1) > 0).all()
    return got


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("B,S,H,D", [(1, 1, 1, 8), (2, 37, 3, 40), (3, 130, 2, 64), (1, 300, 4, 32)])
def test_select_matches_reference(impl, device, B, S, H, D):
    if (impl, device) == INTERP and S > 130:
        pytest.skip("interpreter: small shapes")
    for dtype in _dtypes(impl, device):
        new, cached = drifted(B, S, H, D, dtype, device, strided=S == 37)
        for k in sorted({0, 1, S // 3, S - 1, S} - {-1}):
            check_select(impl, device, new, cached, k)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_select_ties_lowest_index_first(impl, device):
    S = 20
    row_n, row_c = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16)
    new, cached = row_n.expand(2, S, 2, 16).clone(), row_c.expand(2, S, 2, 16).clone()
    new, cached = new.to(device), cached.to(device)
    for k in (0, 1, 7, S):  # every similarity equal: the first k indices
        got = check_select(impl, device, new, cached, k)
        assert torch.equal(got.cpu(), torch.arange(k).expand(2, k))
    # two groups of equal values: tokens 3, 9, 14 are one value (the lowest), the rest another
    low = torch.tensor([3, 9, 14])
    cached2 = cached.clone()
    cached2[:, low] = -new[:, low]
    got = check_select(impl, device, new, cached2, 2)
    assert torch.equal(got.cpu(), torch.tensor([[3, 9], [3, 9]]))
    got = check_select(impl, device, new, cached2, 5)
    assert torch.equal(got.cpu(), torch.tensor([[0, 1, 3, 9, 14]] * 2))


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_select_nan_counts_as_most_changed(impl, device):
    new, cached = drifted(1, 16, 2, 8, torch.float32, device)
    new[0, 11, 1, 3] = float("nan")
    got = hierkern.refresh_select(new, cached, 1, impl=impl)
    assert got.tolist() == [[11]]


def _caches(B, max_len, Hk, D, dtype, device, strided=False):
    if strided:  # both caches interleaved in one (B, max_len, 2, Hk, D) buffer
        buf = torch.randn(B, max_len, 2, Hk, D).to(device=device, dtype=dtype)
        return buf[:, :, 0], buf[:, :, 1]
    return (torch.randn(B, max_len, Hk, D).to(device=device, dtype=dtype),
            torch.randn(B, max_len, Hk, D).to(device=device, dtype=dtype))


def _rope_tables(max_len, D, dtype, device):
    inv = 10000.0 ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = torch.arange(max_len, dtype=torch.float64)[:, None] * inv
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("rope", [None, "float32", "same"])
@pytest.mark.parametrize("B,max_len,n,Hk,D", [(1, 5, 1, 1, 8), (2, 50, 17, 2, 32), (3, 77, 77, 3, 24)])
def test_scatter_matches_reference(impl, device, rope, B, max_len, n, Hk, D):
    for dtype in _dtypes(impl, device):
        kc, vc = _caches(B, max_len, Hk, D, dtype, device, strided=n == 17)
        index = torch.stack([torch.randperm(max_len)[:n] for _ in range(B)]).to(device)
        k, v = make_qkv(B, n, Hk, Hk, D, dtype, device, strides="padded" if n == 17 else "contiguous")[1:]
        cos = sin = None
        if rope:
            cos, sin = _rope_tables(max_len, D, torch.float32 if rope == "float32" else dtype, device)
        kc0, vc0 = kc.clone(), vc.clone()
        hierkern.scatter_kv(kc, vc, index, k, v, cos, sin, impl=impl)
        written = torch.zeros(B, max_len, dtype=torch.bool)
        written[torch.arange(B)[:, None], index.cpu()] = True
        written = written.to(device)
        assert torch.equal(kc[~written], kc0[~written]) and torch.equal(vc[~written], vc0[~written])
        bi = torch.arange(B, device=device)[:, None]
        assert torch.equal(vc[bi, index], v)
        if rope is None:
            assert torch.equal(kc[bi, index], k)
        else:
            ref64 = reference.rope_rows(k.double(), cos.double(), sin.double(), index)
            ref_lowp = reference.rope_rows(k, cos, sin, index)
            assert_close_rel(f"{impl}/{dtype}/k", kc[bi, index], ref64, ref_lowp)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_rope_on_write_equals_rope_then_write(impl, device):
    """hierkern's models rotate with models._block_attention.Rope; writing raw k with the same tables
    lands the same rows as rotating first and writing without rope."""
    from hierkern.models._block_attention import Rope
    B, max_len, n, Hk, D = 2, 40, 9, 2, 32
    kc, vc = _caches(B, max_len, Hk, D, torch.float32, device)
    kc2, vc2 = kc.clone(), vc.clone()
    index = torch.stack([torch.randperm(max_len)[:n] for _ in range(B)]).to(device)
    k, v = make_qkv(B, n, Hk, Hk, D, torch.float32, device)[1:]
    table = Rope(torch.arange(max_len, device=device), D, 10000.0, torch.float32)
    hierkern.scatter_kv(kc, vc, index, k, v, table.cos[:, 0], table.sin[:, 0], impl=impl)
    rotated = torch.stack([Rope(index[b], D, 10000.0, torch.float32)(k[b]) for b in range(B)])
    hierkern.scatter_kv(kc2, vc2, index, rotated, v, impl=impl)
    ref64 = torch.stack([Rope(index[b], D, 10000.0, torch.float64)(k[b].double()) for b in range(B)])
    bi = torch.arange(B, device=device)[:, None]
    assert_close_rel("rope-on-write", kc[bi, index], ref64, kc2[bi, index])
    assert torch.equal(vc, vc2)


@pytest.mark.parametrize("impl,device", BACKENDS + [("reference", "cpu")])
def test_scatter_rejects_bad_indices_and_writes_nothing(impl, device):
    kc, vc = _caches(2, 10, 1, 8, torch.float32, device)
    k, v = make_qkv(2, 3, 1, 1, 8, torch.float32, device)[1:]
    kc0, vc0 = kc.clone(), vc.clone()
    for bad, err, msg in (([[0, 4, 4], [1, 2, 3]], ValueError, "more than once"),
                          ([[0, 1, 2], [7, 8, 10]], IndexError, "range"),
                          ([[0, 1, -1], [1, 2, 3]], IndexError, "range")):
        index = torch.tensor(bad, device=device)
        with pytest.raises((err, RuntimeError), match=msg):
            hierkern.scatter_kv(kc, vc, index, k, v, impl=impl)
        assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_scatter_empty(impl, device):
    kc, vc = _caches(2, 10, 1, 8, torch.float32, device)
    kc0 = kc.clone()
    e = torch.empty(2, 0, 1, 8, device=device)
    hierkern.scatter_kv(kc, vc, torch.empty(2, 0, dtype=torch.int64, device=device), e, e, impl=impl)
    assert torch.equal(kc, kc0)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("B,n,H,Hk,max_len,kv_len", [(1, 1, 2, 2, 9, None), (2, 13, 4, 2, 70, 61),
                                                      (2, 70, 4, 1, 70, None)])
def test_subset_attention(impl, device, B, n, H, Hk, max_len, kv_len):
    D = 32
    q = make_qkv(B, n, H, Hk, D, torch.float32, device, strides="bhsd")[0].requires_grad_()
    _, kc, vc = make_qkv(B, max_len, H, Hk, D, torch.float32, device)
    kv = max_len if kv_len is None else kv_len
    kc[:, kv:] = float("nan")  # rows beyond kv_len must never be read
    vc[:, kv:] = float("nan")
    kc.requires_grad_(), vc.requires_grad_()
    g = torch.randn(B, n, H, D, device=device)
    with poisoned_outputs():
        out, lse = hierkern.subset_attention(q, kc, vc, kv_len, return_lse=True, impl=impl)
        grads = torch.autograd.grad(out, (q, kc, vc), g)

    def ref(dt):
        ls = [t.detach().to(dt).requires_grad_() for t in (q, kc, vc)]
        o, l = hierkern.subset_attention(*ls, kv_len, return_lse=True, impl="reference")
        return (o, l, *torch.autograd.grad(o, ls, g.to(dt)))

    r64, r32 = ref(torch.float64), ref(torch.float32)
    for name, got, a, b in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads), r64, r32):
        if name in ("dk", "dv"):  # dense, zero beyond kv_len
            assert (got[:, kv:] == 0).all()
            got, a, b = got[:, :kv], a[:, :kv], b[:, :kv]
        assert_close_rel(f"{impl}/{name}", got, a, b)
    assert not lse.requires_grad
    # the lse is the log-sum-exp of the scaled scores
    k_rep = kc.detach()[:, :kv].double().repeat_interleave(H // Hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q.detach().double(), k_rep) * D ** -0.5
    torch.testing.assert_close(lse.double(), s.logsumexp(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,device", [b for b in BACKENDS if b[0] == "cpu"] + [("reference", "cpu")])
def test_subset_attention_bf16(impl, device):
    q = make_qkv(2, 5, 4, 2, 64, torch.bfloat16, device)[0]
    _, kc, vc = make_qkv(2, 33, 4, 2, 64, torch.bfloat16, device)
    with poisoned_outputs():
        out = hierkern.subset_attention(q, kc, vc, impl=impl)
    r64 = hierkern.subset_attention(q.double(), kc.double(), vc.double(), impl="reference")
    rlow = hierkern.subset_attention(q, kc, vc, impl="reference")
    assert_close_rel(f"{impl}/bf16", out, r64, rlow)


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_opcheck(impl, device):
    suffix = "_triton" if impl == "triton" else ""
    new, cached = drifted(2, 23, 2, 16, torch.float32, device)
    for k in (0, 5, 23):
        torch.library.opcheck(getattr(torch.ops.hierkern, f"refresh_select{suffix}").default, (new, cached, k))
    kc, vc = _caches(2, 30, 2, 16, torch.float32, device)
    index = torch.stack([torch.randperm(30)[:7] for _ in range(2)]).to(device)
    k, v = make_qkv(2, 7, 2, 2, 16, torch.float32, device)[1:]
    cos, sin = _rope_tables(30, 16, torch.float32, device)
    op = getattr(torch.ops.hierkern, f"scatter_kv{suffix}").default
    torch.library.opcheck(op, (kc, vc, index, k, v, None, None))
    torch.library.opcheck(op, (kc, vc, index, k, v, cos, sin))
