"""KVCache: in-place appends and overwrites, views of the filled part, clear errors."""
import pytest
import torch

import hierkern

B, MAX, HK, D = 2, 10, 3, 8


def rows(n, dtype=torch.float32):
    return torch.randn(B, n, HK, D).to(dtype), torch.randn(B, n, HK, D).to(dtype)


def test_append_writes_in_place_and_returns_filled_views():
    c = hierkern.KVCache(B, MAX, HK, D)
    ptrs = (c.k_cache.data_ptr(), c.v_cache.data_ptr())
    assert c.length == 0 and c.max_len == MAX and c.k_cache.shape == (B, MAX, HK, D)
    k1, v1 = rows(3)
    k2, v2 = rows(4)
    c.append(k1, v1)
    kv, vv = c.append(k2, v2)
    assert c.length == 7 and kv.shape == (B, 7, HK, D)
    torch.testing.assert_close(kv, torch.cat([k1, k2], 1), rtol=0, atol=0)
    torch.testing.assert_close(vv, torch.cat([v1, v2], 1), rtol=0, atol=0)
    # Views of the preallocated buffers: never a reallocation or a copy.
    assert (c.k_cache.data_ptr(), c.v_cache.data_ptr()) == ptrs
    assert kv.data_ptr() == ptrs[0] and vv.data_ptr() == ptrs[1]
    assert c.view()[0].data_ptr() == ptrs[0]


def test_append_up_to_max_len_then_overflow_names_max_len():
    c = hierkern.KVCache(B, MAX, HK, D)
    c.append(*rows(MAX))
    assert c.length == MAX
    with pytest.raises(ValueError, match=r"max_len=10.*length 11|length 11.*max_len=10"):
        c.append(*rows(1))
    assert c.length == MAX  # a failed append changes nothing


def test_overwrite_rewrites_rows_in_place():
    c = hierkern.KVCache(B, MAX, HK, D)
    k, v = rows(6)
    c.append(k, v)
    kn, vn = rows(2)
    kv, vv = c.overwrite(3, kn, vn)
    assert c.length == 6
    want_k = k.clone()
    want_k[:, 3:5] = kn
    want_v = v.clone()
    want_v[:, 3:5] = vn
    torch.testing.assert_close(kv, want_k, rtol=0, atol=0)
    torch.testing.assert_close(vv, want_v, rtol=0, atol=0)
    with pytest.raises(ValueError, match="start=5.*filled length 6"):
        c.overwrite(5, *rows(2))
    with pytest.raises(ValueError, match="start"):
        c.overwrite(-1, *rows(1))


def test_reset_and_truncate():
    c = hierkern.KVCache(B, MAX, HK, D)
    k, v = rows(5)
    c.append(k, v)
    c.truncate(2)
    assert c.length == 2 and c.view()[0].shape[1] == 2
    k2, v2 = rows(3)
    kv, _ = c.append(k2, v2)
    torch.testing.assert_close(kv, torch.cat([k[:, :2], k2], 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="truncate: length"):
        c.truncate(6)
    c.reset()
    assert c.length == 0 and c.view()[0].shape[1] == 0


def test_bad_rows_name_the_argument():
    c = hierkern.KVCache(B, MAX, HK, D, dtype=torch.bfloat16)
    k, v = rows(2, torch.bfloat16)
    with pytest.raises(ValueError, match=r"append: k must have shape"):
        c.append(k[:, :, :1], v)
    with pytest.raises(ValueError, match=r"append: v must have shape"):
        c.append(k, v[..., :4])
    with pytest.raises(TypeError, match=r"append: k has dtype torch.float32.*bfloat16"):
        c.append(k.float(), v)
    with pytest.raises(ValueError, match=r"append: v is on meta"):
        c.append(k, v.to("meta"))
    with pytest.raises(ValueError, match="k has 2 rows but v has 1"):
        c.append(k, v[:, :1])
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        c.append(k.tolist(), v)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="max_len"):
        hierkern.KVCache(1, 0, 1, 8)
    with pytest.raises(ValueError, match="head_dim"):
        hierkern.KVCache(1, 4, 1, 8.0)
    with pytest.raises(TypeError, match="dtype"):
        hierkern.KVCache(1, 4, 1, 8, dtype=torch.int32)


def test_cache_feeds_cached_attention_without_copies():
    """The buffers go to cached_attention as they are, with kv_len = length."""
    c = hierkern.KVCache(1, 40, 2, 32)
    c.k_cache.fill_(float("nan"))
    c.v_cache.fill_(float("nan"))
    k, v = torch.randn(1, 13, 2, 32), torch.randn(1, 13, 2, 32)
    c.append(k, v)
    q = torch.randn(1, 3, 4, 32)
    out = hierkern.cached_attention(q, c.k_cache, c.v_cache, c.length, impl="reference")
    ref = hierkern.cached_attention(q, k, v, 13, impl="reference")
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
