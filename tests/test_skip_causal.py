"""skip_causal_attention / block_causal_attention: the reference mask against a brute-force
per-element definition, the per-row ranges (patterns.py) against the mask, the C++ CPU and Triton
kernels against the float64 reference (forward and backward), bad inputs, opcheck, and tiny CPU tiles."""
import os
import subprocess
import sys

import pytest
import torch

import hierkern
from hierkern import _backend
from hierkern.ops.attention import patterns
from hierkern.ops.attention.patterns import BLOCK_CAUSAL, SKIP_CLEAN_FIRST, SKIP_NOISY_FIRST
from hierkern.ops.attention.reference import interval_mask
from hierkern.testing import assert_close_rel, kernel_backends, make_qkv, poisoned_outputs

needs_cpu_ops = pytest.mark.skipif(not _backend.has_compiled_ops(), reason="hierkern._C not built")
TRITON = [b for b in kernel_backends() if b[0] == "triton"]
KINDS = {"noisy_first": SKIP_NOISY_FIRST, "clean_first": SKIP_CLEAN_FIRST, "block_causal": BLOCK_CAUSAL}


def brute_force_mask(doc_lens, kind, B):
    """The semantics element by element (DESIGN.md §2), independent of the kernels' range formulas."""
    doc, local = [], []
    for d, n in enumerate(doc_lens):
        doc += [d] * n
        local += list(range(n))
    L = len(doc)
    m = torch.zeros(L, L, dtype=torch.bool)
    for r in range(L):
        for j in range(L):
            if doc[r] != doc[j]:
                continue
            x, y = local[r], local[j]
            if kind == "block_causal":
                m[r, j] = y < (x // B + 1) * B
                continue
            n = doc_lens[doc[r]] // 2
            first_is_noisy = kind == "noisy_first"
            r_noisy, k_noisy = (x < n) == first_is_noisy, (y < n) == first_is_noisy
            rb, kb = (x % n) // B, (y % n) // B
            if r_noisy:
                m[r, j] = (k_noisy and kb == rb) or (not k_noisy and kb < rb)
            else:
                m[r, j] = not k_noisy and kb <= rb
    return m


def _offsets(doc_lens):
    out = [0]
    for n in doc_lens:
        out.append(out[-1] + n)
    return tuple(out)


MASK_CASES = [
    ("noisy_first", (24,), 4), ("clean_first", (24,), 4), ("noisy_first", (8, 24, 16), 4),
    ("clean_first", (8, 24, 16), 4), ("noisy_first", (6, 2, 10), 1), ("clean_first", (22, 44), 11),
    ("block_causal", (13,), 4), ("block_causal", (5, 12, 7, 1), 4), ("block_causal", (9, 3), 1),
]


@pytest.mark.parametrize("kind,doc_lens,B", MASK_CASES)
def test_reference_mask_matches_brute_force(kind, doc_lens, B):
    got = interval_mask(_offsets(doc_lens), KINDS[kind], block_size=B)
    want = brute_force_mask(doc_lens, kind, B)
    assert torch.equal(got, want)


def test_brute_force_mask_known_small_case():
    # N = 4, B = 2, noisy_first [x_t ; x_0]: the BD3-LM picture written out by hand.
    want = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(brute_force_mask((8,), "noisy_first", 2), want)
    # clean_first is the same relation with the halves swapped.
    perm = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    assert torch.equal(brute_force_mask((8,), "clean_first", 2), want[perm][:, perm])


@pytest.mark.parametrize("kind,doc_lens,B", MASK_CASES)
def test_row_and_key_ranges_match_mask(kind, doc_lens, B):
    offsets = _offsets(doc_lens)
    mask = interval_mask(offsets, KINDS[kind], block_size=B)
    L = offsets[-1]

    def as_row(ranges):
        (a0, b0), (a1, b1) = ranges
        assert a0 <= b0 and a1 <= b1 and (a1 >= b1 or b0 <= a1), f"ranges not ascending: {ranges}"
        row = torch.zeros(L, dtype=torch.bool)
        row[a0:b0] = True
        row[a1:b1] = True
        return row

    for r in range(L):
        assert torch.equal(as_row(patterns.row_key_ranges(offsets, KINDS[kind], r, B)), mask[r]), r
    for j in range(L):
        assert torch.equal(as_row(patterns.key_query_ranges(offsets, KINDS[kind], j, B)), mask[:, j]), j
    assert patterns.visible_pairs(offsets, KINDS[kind], B) == int(mask.sum())


def _run(kind, q, k, v, B, cu_seqlens, impl):
    if kind == "block_causal":
        return hierkern.block_causal_attention(q, k, v, B, cu_seqlens=cu_seqlens, impl=impl)
    return hierkern.skip_causal_attention(q, k, v, B, order=kind, cu_seqlens=cu_seqlens, impl=impl)


def _check(kind, L, B, cu_seqlens=None, dtype=torch.float32, H=2, Hkv=1, D=32, strides="contiguous",
           batch=2, impl="cpu", device="cpu"):
    q, k, v = make_qkv(batch, L, H, Hkv, D, dtype, device, strides, requires_grad=True)
    g = torch.randn(batch, L, H, D, device=device).to(dtype)
    with poisoned_outputs():
        out = _run(kind, q, k, v, B, cu_seqlens, impl)
        grads = torch.autograd.grad(out, (q, k, v), g)

    def ref(dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        o = _run(kind, *leaves, B, cu_seqlens, "reference")
        return (o, *torch.autograd.grad(o, leaves, g.to(dt)))

    for name, got, a, b in zip(("out", "dq", "dk", "dv"), (out, *grads), ref(torch.float64), ref(dtype)):
        assert got.dtype == dtype
        assert_close_rel(f"{impl}/{kind}/B={B}/{name}", got, a, b)


# N per block size chosen so that 2N is not a multiple of any CPU tile (128 rows, 512 keys, 16-key
# panels) and noisy/clean halves end mid-tile.
BLOCK_N = {1: 37, 4: 132, 11: 143, 16: 144, 64: 192}


@needs_cpu_ops
@pytest.mark.parametrize("order", ["noisy_first", "clean_first"])
@pytest.mark.parametrize("B", list(BLOCK_N))
def test_cpu_skip_causal(order, B):
    _check(order, 2 * BLOCK_N[B], B)


@needs_cpu_ops
@pytest.mark.parametrize("B,L", [(1, 37), (4, 263), (11, 143), (16, 300), (64, 200)])
def test_cpu_block_causal(B, L):
    _check("block_causal", L, B)


@needs_cpu_ops
@pytest.mark.parametrize("order", ["noisy_first", "clean_first"])
@pytest.mark.parametrize("as_type", ["list", "int32", "int64"])
def test_cpu_packed_documents(order, as_type):
    # Unequal documents: tiny ones packed into one query tile, a long one split across tiles.
    doc_lens = (8, 264, 40, 136)
    cu = list(_offsets(doc_lens))
    cu = cu if as_type == "list" else torch.tensor(cu, dtype=getattr(torch, as_type))
    _check(order, sum(doc_lens), 4, cu_seqlens=cu)


@needs_cpu_ops
def test_cpu_block_causal_packed():
    doc_lens = (5, 130, 77, 1)
    _check("block_causal", sum(doc_lens), 16, cu_seqlens=_offsets(doc_lens))


@needs_cpu_ops
@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_gqa_strides_dtypes(kind, dtype):
    _check(kind, 2 * 80, 16, cu_seqlens=(0, 64, 160), dtype=dtype, H=4, Hkv=2, D=64, strides="bhsd",
           batch=1)


@needs_cpu_ops
def test_cpu_masks_really_differ():
    # The orders and block sizes change the result (a kernel ignoring pattern or block_size would fail).
    q, k, v = make_qkv(1, 64, 2, 2, 32)
    a = hierkern.skip_causal_attention(q, k, v, 4, impl="cpu")
    b = hierkern.skip_causal_attention(q, k, v, 4, order="clean_first", impl="cpu")
    c = hierkern.skip_causal_attention(q, k, v, 8, impl="cpu")
    d = hierkern.skip_causal_attention(q, k, v, 4, cu_seqlens=[0, 32, 64], impl="cpu")
    for other in (b, c, d):
        assert (a - other).abs().max() > 1e-3


# --- Triton (compiled on a GPU, interpreted on CPU tensors otherwise: tiny shapes) ----------------
# The interpreter's tiles are 32 x 16 (fwd, dQ) and 16 x 32 (dK/dV): each N below (except where the
# block size forces a multiple) is a multiple of neither, so halves and documents end mid-tile.
TRITON_N = {1: 37, 4: 44, 11: 33, 16: 48, 64: 64}


@pytest.mark.parametrize("impl,device", TRITON)
@pytest.mark.parametrize("order", ["noisy_first", "clean_first"])
@pytest.mark.parametrize("B", list(TRITON_N))
def test_triton_skip_causal(impl, device, order, B):
    _check(order, 2 * TRITON_N[B], B, batch=1, impl=impl, device=device)


@pytest.mark.parametrize("impl,device", TRITON)
@pytest.mark.parametrize("B,L", [(1, 37), (4, 53), (11, 46), (16, 75), (64, 100)])
def test_triton_block_causal(impl, device, B, L):
    _check("block_causal", L, B, batch=1, impl=impl, device=device)


@pytest.mark.parametrize("impl,device", TRITON)
@pytest.mark.parametrize("kind,doc_lens,B", [
    ("noisy_first", (8, 56, 24), 4), ("clean_first", (8, 56, 24), 4), ("noisy_first", (2, 34, 6), 1),
    ("block_causal", (5, 40, 19, 1), 4)])
def test_triton_packed_documents(impl, device, kind, doc_lens, B):
    # Unequal documents: one smaller than a tile, one split across tiles, both in one launch.
    _check(kind, sum(doc_lens), B, cu_seqlens=list(_offsets(doc_lens)), batch=1, impl=impl, device=device)


@pytest.mark.parametrize("impl,device", TRITON)
@pytest.mark.parametrize("kind", list(KINDS))
def test_triton_gqa_strides_fp16(impl, device, kind):
    # The interpreter has no bf16 dot; fp16 exercises the 16-bit path.
    _check(kind, 2 * 36, 4, cu_seqlens=(0, 24, 72), dtype=torch.float16, H=4, Hkv=2, D=48, strides="bhsd",
           batch=1, impl=impl, device=device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="impl=None picks Triton on CUDA tensors")
def test_default_impl_on_cuda_is_triton():
    q, k, v = make_qkv(1, 64, 2, 1, 64, torch.float16, "cuda")
    for kind in KINDS:
        torch.testing.assert_close(_run(kind, q, k, v, 4, None, None), _run(kind, q, k, v, 4, None, "triton"),
                                   rtol=0, atol=0)


# --- bad inputs -----------------------------------------------------------------------------------

def _qkv(L=32):
    return make_qkv(1, L, 2, 2, 32)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(block_size=5), ValueError, "block_size 5 does not divide"),
    (dict(block_size=0), ValueError, "block_size must be >= 1"),
    (dict(block_size=True), TypeError, "block_size"),
    (dict(block_size=4.0), TypeError, "block_size"),
    (dict(block_size=4, order="noisy"), ValueError, "order"),
    (dict(block_size=4, cu_seqlens=[0, 10, 32]), ValueError, "document 0 has odd length|does not divide"),
    (dict(block_size=4, cu_seqlens=[0, 9, 32]), ValueError, "odd length 9"),
    (dict(block_size=4, cu_seqlens=[0, 16]), ValueError, "cu_seqlens ends at 16"),
    (dict(block_size=4, cu_seqlens=[8, 32]), ValueError, "cu_seqlens must start at 0"),
    (dict(block_size=4, cu_seqlens=[0, 16, 16, 32]), ValueError, "strictly increasing"),
    (dict(block_size=4, cu_seqlens=torch.tensor([0, 16, 32.0])), ValueError, "cu_seqlens must be a 1-D int"),
    (dict(block_size=4, cu_seqlens=torch.tensor([[0, 16, 32]])), ValueError, "cu_seqlens must be a 1-D int"),
    (dict(block_size=4, cu_seqlens="0,32"), TypeError, "cu_seqlens"),
    (dict(block_size=4, impl="cuda"), NotImplementedError, "skip_causal_attention: impl='cuda'"),
    (dict(block_size=4, impl="fast"), ValueError, "impl"),
])
def test_skip_causal_bad_inputs(kwargs, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        hierkern.skip_causal_attention(q, k, v, **kwargs)


def test_skip_causal_bad_tensors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k has sequence length"):
        hierkern.skip_causal_attention(q, k[:, :16], v[:, :16], 4)
    with pytest.raises(ValueError, match="q"):
        hierkern.skip_causal_attention(q[0], k, v, 4)
    with pytest.raises(ValueError, match="dtype"):
        hierkern.skip_causal_attention(q, k.double(), v, 4)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(block_size=0), ValueError, "block_size must be >= 1"),
    (dict(block_size=4, cu_seqlens=[0, 40]), ValueError, "cu_seqlens ends at 40"),
    (dict(block_size=4, impl="cuda"), NotImplementedError, "block_causal_attention: impl='cuda'"),
])
def test_block_causal_bad_inputs(kwargs, exc, match):
    q, k, v = _qkv()
    with pytest.raises(exc, match=match):
        hierkern.block_causal_attention(q, k, v, **kwargs)


@needs_cpu_ops
def test_cpp_op_validates_block_size():
    # The C++ op checks what it can read on the host, whatever the Python wrapper did.
    q, k, v = _qkv()
    off = torch.tensor([0, 32], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="block_size must be >= 1"):
        torch.ops.hierkern.interval_attn_fwd(q, k, v, off, SKIP_NOISY_FIRST, 0, 1.0)
    with pytest.raises(RuntimeError, match="multiple of block_size"):
        torch.ops.hierkern.interval_attn_fwd(q, k, v, off, SKIP_CLEAN_FIRST, 3, 1.0)
    with pytest.raises(RuntimeError, match="multiple of block_size"):
        torch.ops.hierkern.interval_attn_fwd(q, k, v, torch.tensor([0, 9, 32], dtype=torch.int32),
                                             SKIP_NOISY_FIRST, 1, 1.0)
    with pytest.raises(RuntimeError, match="block_size must be >= 1"):
        torch.ops.hierkern.interval_attn_fwd(q, k, v, off, BLOCK_CAUSAL, -1, 1.0)


@needs_cpu_ops
@pytest.mark.parametrize("pattern,B", [(SKIP_NOISY_FIRST, 4), (SKIP_CLEAN_FIRST, 2), (BLOCK_CAUSAL, 3)])
def test_opcheck_block_patterns(pattern, B):
    q, k, v = make_qkv(2, 24, 4, 2, 32, requires_grad=True)
    off = torch.tensor([0, 8, 24], dtype=torch.int32)
    torch.library.opcheck(torch.ops.hierkern.interval_attn_fwd.default, (q, k, v, off, pattern, B, 0.2, None))
    out, lse = torch.ops.hierkern.interval_attn_fwd(q, k, v, off, pattern, B, 0.2)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), off,
            pattern, B, 0.2, None)
    torch.library.opcheck(torch.ops.hierkern.interval_attn_bwd.default, args)


# --- tiny CPU tiles (knobs read once at load, hence a subprocess) ---------------------------------

TINY_SCRIPT = """
import torch, hierkern
from hierkern.testing import assert_close_rel, make_qkv, poisoned_outputs
torch.manual_seed(0)
cases = [("noisy_first", 1, None, 2 * 23), ("clean_first", 4, None, 2 * 36),
         ("noisy_first", 4, [0, 8, 80, 120], 120), ("clean_first", 11, [0, 22, 88], 88),
         ("block_causal", 4, None, 53), ("block_causal", 16, [0, 3, 40, 75], 75)]
for kind, B, cu, L in cases:
    for dtype in (torch.float32, torch.bfloat16):
        def run(q, k, v, impl):
            if kind == "block_causal":
                return hierkern.block_causal_attention(q, k, v, B, cu_seqlens=cu, impl=impl)
            return hierkern.skip_causal_attention(q, k, v, B, order=kind, cu_seqlens=cu, impl=impl)
        q, k, v = make_qkv(2, L, 4, 2, 32, dtype, "cpu", "bhsd", requires_grad=True)
        g = torch.randn(2, L, 4, 32).to(dtype)
        with poisoned_outputs():
            o = run(q, k, v, "cpu")
            got = (o, *torch.autograd.grad(o, (q, k, v), g))
        def ref(dt):
            leaves = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
            r = run(*leaves, "reference")
            return (r, *torch.autograd.grad(r, leaves, g.to(dt)))
        for name, a, b, c in zip("o dq dk dv".split(), got, ref(torch.float64), ref(dtype)):
            assert_close_rel(f"{kind}/{B}/{cu}/{dtype}/{name}", a, b, c)
print("OK")
"""


@needs_cpu_ops
@pytest.mark.parametrize("bq,bk,schedule", [(16, 32, "pairs"), (8, 24, "tiles")])
def test_cpu_tiny_tiles(bq, bk, schedule):
    env = dict(os.environ, HIERKERN_CPU_BLOCK_Q=str(bq), HIERKERN_CPU_BLOCK_K=str(bk),
               HIERKERN_CPU_FWD_SCHEDULE=schedule)
    r = subprocess.run([sys.executable, "-c", TINY_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr[-4000:]
