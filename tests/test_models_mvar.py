"""M-VAR reference model: impl="reference" vs impl="kernels" on the same weights (logits and every
parameter gradient, precision-relative to float64), generation with the Mamba state carried across
scales vs recomputing the prefix, carried teacher forcing vs one whole forward, the Mamba-2 mixer
fed in pieces vs whole, the dependency structure, a training step, presets and bad inputs."""
import math

import pytest
import torch

import hierkern
from hierkern.models import MVAR
from hierkern.models._mamba2 import Mamba2Mixer
from hierkern.testing import assert_close_rel
from model_helpers import (assert_greedy_generation_kernels_equals_reference,
                           assert_greedy_generation_matches_forward, logits_and_grads, loss_and_grads, tokens_labels)

_missing = [n for n in ("next_scale_attention", "ssd_scan", "causal_conv1d") if not hasattr(hierkern, n)]
needs_kernels = pytest.mark.skipif(bool(_missing), reason="impl='kernels' needs hierkern."
                                   + ", hierkern.".join(_missing) + " (not in this build yet)")
IMPLS = ["reference", pytest.param("kernels", marks=needs_kernels)]

# 2 layers, width 128 -> d_inner 256 = 16 Mamba heads of 16, state 8; L = 30 spans one 16-step SSD
# chunk boundary per scale or so (chunk_size 16 < 30), so the scan's chunking is exercised
TINY = dict(vocab_size=64, num_classes=10, depth=2, patch_nums=(1, 2, 3, 4), cond_drop_rate=0.0,
            d_state=8, headdim=16, chunk_size=16)


def randomize(model, seed=0):
    """Weights of order-one effect everywhere (VAR's init leaves every AdaLN gate near 1e-5, so
    attention would be invisible in the outputs). Mamba's A stays negative (A = -exp(A_log)) with
    decays exp(dt A) spread over (0, 1), so the state carries information across scales."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("temperature"):
                p.copy_(torch.empty(p.shape).uniform_(math.log(2.0), math.log(8.0), generator=g))
            elif name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(-2.0, 1.0, generator=g))
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("norm_weight") else 0.0))
    return model


def make(impl="reference", seed=0, **kw):
    return randomize(MVAR(**{**TINY, **kw}, impl=impl), seed).eval()


@needs_kernels
@pytest.mark.parametrize("state_carry", [False, True], ids=["whole", "carried"])
def test_kernels_match_reference(state_carry):
    model = make()
    tokens, labels = tokens_labels(model)
    weight = torch.randn(*tokens.shape, model.vocab_size, generator=torch.Generator().manual_seed(3))
    out64, g64 = logits_and_grads(model.double(), tokens, labels, weight, impl="reference")
    model.float()
    out32, g32 = logits_and_grads(model, tokens, labels, weight, impl="reference")
    outk, gk = logits_and_grads(model, tokens, labels, weight, impl="kernels", state_carry=state_carry)
    assert_close_rel("logits", outk, out64, out32)
    assert g64.keys() == gk.keys()
    for name in g64:
        # per-head sums over every (batch, position) term whose float32 error depends on the order of
        # summation (cos-attention temperature; the scan's A and dt bias, summed over time in chunks)
        wide = name.endswith(("temperature", "A_log", "dt_bias"))
        assert_close_rel(f"grad {name}", gk[name], g64[name], g32[name], factor=16.0 if wide else 2.0)
    for name in ("mambas.0.A_log", "mambas.0.conv_weight", "mambas.1.D", "blocks.0.attn.temperature"):
        assert gk[name].abs().max() > 0, f"{name} receives no gradient"


@needs_kernels
@pytest.mark.parametrize("state_carry", [False, True], ids=["whole", "carried"])
def test_loss_kernels_match_reference(state_carry):
    # model.loss on impl="kernels": the fused cross-entropy takes the head's bias (the head's GEMM runs
    # without it), also through the scale-by-scale forward; loss and every gradient against float64
    model = make()
    tokens, labels = tokens_labels(model)

    model.double()
    l64, g64 = loss_and_grads(model, tokens, labels, impl="reference")
    model.float()
    l32, g32 = loss_and_grads(model, tokens, labels, impl="reference")
    lk, gk = loss_and_grads(model, tokens, labels, impl="kernels", state_carry=state_carry)
    assert not model.head._bias_deferred
    assert_close_rel("loss", lk, l64, l32)
    assert gk["head.out.bias"].abs().max() > 0
    for name in g64:
        wide = name.endswith(("temperature", "A_log", "dt_bias"))  # see test_kernels_match_reference
        assert_close_rel(f"loss grad {name}", gk[name], g64[name], g32[name], factor=16.0 if wide else 2.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_carried_teacher_forcing_equals_whole_forward(impl):
    """Scale by scale from the carried Mamba states (generate's computation) gives every scale the
    logits of one forward over the whole sequence."""
    model = make()
    tokens, labels = tokens_labels(model, batch=3)
    with torch.no_grad():
        ref64 = model.double()(tokens, labels, impl="reference")
        ref32 = model.float()(tokens, labels, impl="reference")
        whole = model(tokens, labels, impl=impl)
        carried = model(tokens, labels, impl=impl, state_carry=True)
    off = model.layout.offsets
    for si in range(model.layout.num_scales):
        s = slice(off[si], off[si + 1])
        assert_close_rel(f"scale {si} whole", whole[:, s], ref64[:, s], ref32[:, s])
        assert_close_rel(f"scale {si} carried", carried[:, s], ref64[:, s], ref32[:, s])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sampling", [dict(top_k=1), dict(top_k=16, top_p=0.95)], ids=["greedy", "seeded"])
def test_state_carry_generation_equals_prefix_recompute(impl, sampling, monkeypatch):
    model = make()
    labels = torch.tensor([3, 7])
    lengths = []
    inner = model.sequence_logits

    def spy(x, *args, **kw):
        lengths.append(x.shape[1])
        return inner(x, *args, **kw)
    monkeypatch.setattr(model, "sequence_logits", spy)
    runs = []
    for state_carry in (True, False):
        lengths.clear()
        g = torch.Generator().manual_seed(11)
        runs.append(model.generate(labels, cfg=2.0, generator=g, state_carry=state_carry, impl=impl, **sampling))
        # carried: each scale runs once over its own tokens; recompute: over the whole prefix
        sizes, off = model.layout.sizes, model.layout.offsets
        assert lengths == (list(sizes) if state_carry else list(off[1:])), lengths
    for si, (a, b) in enumerate(zip(*runs)):
        assert a.shape == (2, model.layout.sizes[si])
        assert torch.equal(a, b), f"scale {si}: carried {a.tolist()} != recomputed {b.tolist()}"
    # the comparison means something only if later scales depend on the sampled earlier ones
    assert len({tuple(t.flatten().tolist()) for t in runs[0][1:]}) > 1


@pytest.mark.parametrize("impl", IMPLS)
def test_carried_generation_matches_forward(impl):
    assert_greedy_generation_matches_forward(make(), impl)


@needs_kernels
def test_greedy_generation_kernels_equals_reference():
    model = make()
    assert_greedy_generation_kernels_equals_reference(model)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("pieces", [(37,), (1, 1, 1, 34), (2, 9, 16, 10), (20, 17)])
def test_mixer_in_pieces_equals_whole(impl, pieces):
    """The conv and SSM states returned after a piece continue the sequence exactly, also for pieces
    shorter than the conv's d_conv - 1 = 3 history and across SSD chunk boundaries."""
    torch.manual_seed(0)
    mixer = randomize(Mamba2Mixer(32, d_state=8, headdim=16, chunk_size=8))
    u = torch.randn(2, sum(pieces), 32)
    with torch.no_grad():
        ref64 = mixer.double()(u.double(), "reference")
        mixer.float()
        ref32 = mixer(u, "reference")
        outs, state = [], None
        for piece in u.split(pieces, dim=1):
            out, state = mixer(piece, impl, state=state, return_state=True)
            outs.append(out)
    assert state[0].shape == (2, mixer.conv_dim, 3) and state[1].shape == (2, mixer.nheads, 16, 8)
    assert state[1].dtype == torch.float32
    assert_close_rel("pieces", torch.cat(outs, dim=1), ref64, ref32)


@pytest.mark.parametrize("impl", IMPLS)
def test_next_scale_dependencies(impl):
    """A change in scale-1 tokens moves the logits of scale 2 (its input) and of scale 3 (through
    the Mamba state), never of scales 0 and 1 (the scan is causal, attention stays in a scale)."""
    model = make()
    tokens, labels = tokens_labels(model, batch=1)
    off = model.layout.offsets
    other = tokens.clone()
    other[:, off[1]:off[2]] = (other[:, off[1]:off[2]] + 1) % model.vocab_size
    with torch.no_grad():
        a, b = model(tokens, labels, impl=impl), model(other, labels, impl=impl)
    for s in range(4):
        diff = (a[:, off[s]:off[s + 1]] - b[:, off[s]:off[s + 1]]).abs().max().item()
        if s >= 2:
            assert diff > 1e-3, f"scale {s} ignores scale-1 tokens"
        else:
            assert diff == 0.0, f"scale {s} depends on scale-1 tokens ({diff})"


@pytest.mark.parametrize("impl", IMPLS)
def test_training_step_with_default_init(impl):
    model = MVAR(vocab_size=64, num_classes=10, depth=2, patch_nums=(1, 2, 3), cond_drop_rate=0.5, d_state=16,
                 impl=impl)
    tokens, labels = tokens_labels(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    logits = model(list(tokens.split(model.layout.sizes, dim=1)), labels)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    loss.backward()
    assert math.isfinite(loss.item()) and logits.shape == (2, 14, 64)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    before = model.mambas[0].in_proj.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.mambas[0].in_proj.weight)
    model.eval()
    out = model.generate([1, 2], generator=torch.Generator().manual_seed(0))
    assert [t.shape for t in out] == [(2, 1), (2, 4), (2, 9)]


def test_default_init_is_mamba2s():
    m = MVAR(depth=2, patch_nums=(1, 2)).mambas[0]
    A = -torch.exp(m.A_log)
    assert (A <= -1.0).all() and (A >= -16.0).all()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert (dt >= 1e-3 * 0.999).all() and (dt <= 0.1 * 1.001).all()
    assert torch.equal(m.D, torch.ones_like(m.D))
    assert (m.d_inner, m.nheads, m.d_state, m.d_conv) == (256, 4, 64, 4)


def test_presets_have_var_sizes_plus_mamba():
    with torch.device("meta"):
        d16 = MVAR.preset("d16")
    assert (d16.width, d16.heads, d16.layout.L) == (1024, 16, 680)
    mix = d16.mambas[0]
    assert (mix.d_inner, mix.nheads, mix.headdim, mix.d_state) == (2048, 32, 64, 64)
    n = sum(p.numel() for p in d16.parameters())
    # VAR-d16's 310M plus per layer in_proj 1024 x (2*2048 + 2*64 + 32) and out_proj 2048 x 1024
    assert 300e6 + 16 * (1024 * 4256 + 2048 * 1024) < n < 320e6 + 16 * (1024 * 4256 + 2048 * 1024) + 1e6, n
    with pytest.raises(ValueError, match="name"):
        MVAR.preset("d17")


def test_bad_inputs_name_the_argument(monkeypatch):
    model = make()
    tokens, labels = tokens_labels(model)
    cases = [
        (lambda: model(tokens[:, :-1], labels), ValueError, r"tokens must have shape \(batch, 30\)"),
        (lambda: model(tokens + model.vocab_size, labels), ValueError, r"tokens must hold token ids in \[0, 64\)"),
        (lambda: model(tokens.float(), labels), TypeError, "tokens must have an integer dtype"),
        (lambda: model(tokens, labels[:1]), ValueError, "labels has 1 entries but tokens has batch 2"),
        (lambda: model(tokens, labels + 11), ValueError, r"labels must be class ids in \[0, 10\]"),
        (lambda: model(tokens, labels - 20), ValueError, r"labels must be class ids in \[0, 10\]"),
        (lambda: model(tokens, labels, state_carry=1), TypeError, "state_carry must be a bool"),
        (lambda: model(tokens, labels, impl="cuda"), ValueError, "impl must be 'reference' or 'kernels'"),
        (lambda: model.generate(labels + 11), ValueError, r"labels must be class ids"),
        (lambda: model.generate(labels, state_carry="yes"), TypeError, "state_carry must be a bool"),
        (lambda: model.generate(labels, top_p=1.5), ValueError, "top_p"),
        (lambda: model.generate(labels, top_k=-1), ValueError, "top_k"),
        (lambda: model.generate(labels, cfg=-1), ValueError, "cfg"),
        (lambda: model.generate(labels, generator=0), TypeError, "generator"),
        (lambda: MVAR(depth=2, d_state=0), ValueError, "d_state must be a positive int"),
        (lambda: MVAR(depth=2, headdim=48), ValueError, r"must be a multiple of headdim \(48\)"),
        (lambda: MVAR(depth=2, ngroups=3), ValueError, r"multiple of ngroups \(3\)"),
        (lambda: MVAR(depth=2, impl="triton"), ValueError, "impl must be"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()
    monkeypatch.delattr(hierkern, "ssd_scan", raising=False)
    with pytest.raises(RuntimeError, match="hierkern.ssd_scan"):
        model.generate(labels, impl="kernels")
