"""Block-wise inference of block-diffusion LMs on the same kernels: a block-causal prefill, then a block
(or a Fast-dLLM v2 sub-block) attending [prefix cache ; block buffer] through cached_attention, with
KVCache.append / overwrite keeping the buffer in place. Every step must equal the dense-mask semantics
of the whole sequence."""
import pytest
import torch

import hierkern
from hierkern.testing import assert_close_rel, kernel_backends, poisoned_outputs

BACKENDS = [b for b in kernel_backends() if b[0] != "cuda"]  # cached_attention has no CUDA C++ kernel
B, H, HK, D = 2, 4, 2, 32


def _rand(n, heads, device, gen):
    return torch.randn(B, n, heads, D, generator=gen).to(device)


def _dense(q, k, v, mask, dtype=torch.float64):
    """Attention of q rows over k/v under a (Lq, Lk) bool mask in `dtype` (eager, the semantics),
    GQA by repeating kv heads."""
    rep = q.shape[2] // k.shape[2]
    q, k, v = (t.to(dtype).transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    s = (q @ k.transpose(-1, -2)) / D ** 0.5
    s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("impl,device", BACKENDS)
@pytest.mark.parametrize("prompt,block", [(12, 4), (7, 4), (16, 8)])
def test_prefill_then_blocks_equal_the_staircase(impl, device, prompt, block):
    """Prefill with block_causal_attention, then append whole blocks and attend them with
    cached_attention: each block's output equals block-causal attention over the whole sequence."""
    gen = torch.Generator().manual_seed(prompt * 10 + block)
    n_blocks = 3
    total = prompt + n_blocks * block
    q, k, v = _rand(total, H, device, gen), _rand(total, HK, device, gen), _rand(total, HK, device, gen)
    # The prompt's own blocks: SDAR aligns blocks from position 0, so a partial last prompt block is
    # completed by the first generated tokens; here the prompt ends on its own staircase.
    r = torch.arange(total)
    staircase = r[None, :] < ((r[:, None] // block) + 1) * block
    want = _dense(q, k, v, staircase.to(device))
    cache = hierkern.KVCache(B, total + 5, HK, D, device=device)
    with poisoned_outputs():
        pre = hierkern.block_causal_attention(q[:, :prompt], k[:, :prompt], v[:, :prompt], block, impl=impl)
    assert_close_rel("prefill", pre, want[:, :prompt], _dense(q[:, :prompt], k[:, :prompt], v[:, :prompt],
                     staircase[:prompt, :prompt].to(device), torch.float32))
    cache.append(k[:, :prompt], v[:, :prompt])
    # Generated blocks start where the staircase puts them: the next multiple of block.
    start = prompt
    while start < total:
        end = min(total, (start // block + 1) * block)
        cache.append(k[:, start:end], v[:, start:end])
        with poisoned_outputs():
            got = hierkern.cached_attention(q[:, start:end], cache.k_cache, cache.v_cache, end, impl=impl)
        assert_close_rel(f"block [{start}, {end})", got, want[:, start:end],
                         _dense(q[:, start:end], cache.k_cache[:, :end], cache.v_cache[:, :end],
                                staircase[start:end, :end].to(device), torch.float32))
        start = end


@pytest.mark.parametrize("impl,device", BACKENDS)
def test_sub_block_overwrite_attends_the_partly_stale_block(impl, device):
    """Fast-dLLM v2: a 16-token block decoded in 4-token sub-blocks. Each step recomputes one
    sub-block's K/V, overwrites them in place in the block buffer and attends [prefix ; whole block]
    (other sub-blocks' K/V possibly stale) with no mask."""
    gen = torch.Generator().manual_seed(5)
    prefix, block, sub = 9, 16, 4
    cache = hierkern.KVCache(B, prefix + block, HK, D, device=device)
    cache.append(_rand(prefix, HK, device, gen), _rand(prefix, HK, device, gen))
    cache.append(_rand(block, HK, device, gen), _rand(block, HK, device, gen))  # the block's first pass
    ptr = cache.k_cache.data_ptr()
    for step, s0 in enumerate([0, 4, 8, 12, 4]):  # revisiting sub-block 4 reads its refreshed rows
        k_new, v_new = _rand(sub, HK, device, gen), _rand(sub, HK, device, gen)
        kv, vv = cache.overwrite(prefix + s0, k_new, v_new)
        assert cache.length == prefix + block and cache.k_cache.data_ptr() == ptr
        q = _rand(sub, H, device, gen)
        with poisoned_outputs():
            got = hierkern.cached_attention(q, cache.k_cache, cache.v_cache, cache.length, impl=impl)
        full = torch.ones(sub, prefix + block, dtype=torch.bool, device=device)
        want = _dense(q, kv, vv, full)
        assert torch.equal(kv[:, prefix + s0:prefix + s0 + sub], k_new)
        assert_close_rel(f"step {step}", got, want, _dense(q, kv, vv, full, torch.float32))
