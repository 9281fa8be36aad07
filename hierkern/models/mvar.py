"""M-VAR: next-scale prediction where attention stays inside a scale and a Mamba-2 layer carries
information across scales, generated scale by scale with the Mamba state carried between scales."""
import torch
import torch.nn as nn

from . import _attention
from ._mamba2 import Mamba2Mixer
from ._next_scale import NextScaleTransformer, _check_positive_int
from ._sampling import check_sampling_args

_KERNEL_APIS = ("next_scale_attention", "ssd_scan", "causal_conv1d")


class MVAR(NextScaleTransformer):
    """M-VAR (Ren et al. 2024) with random weights and token ids in place of a VQ-VAE.

    MVAR(d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=64, **VAR's constructor
        arguments); MVAR.preset("d16" | "d20" | "d24" | "d30", **overrides) as VAR.

    Layer i: x = x + Mamba2_i(LayerNorm_i(x)) over the whole multi-scale sequence (causal, so a scale
    sees every earlier scale through it), then VAR's AdaLN block whose cos attention is block-diagonal
    (pattern="diagonal": each scale attends only to itself). The backbone (embedding, class
    conditioning, AdaLN, head, init, sizes) is VAR's.

    impl="reference": dense-mask SDPA attention and the PyTorch causal conv and chunked SSD scan (the
    eager baseline); impl="kernels": hierkern.next_scale_attention, causal_conv1d and ssd_scan on
    their fastest backends. forward/generate take impl=None to use the model's.
    """

    pattern = "diagonal"

    def __init__(self, *, d_state=64, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=64, **kwargs):
        super().__init__(**kwargs)
        for arg, value in (("d_state", d_state), ("d_conv", d_conv), ("expand", expand), ("headdim", headdim),
                           ("ngroups", ngroups), ("chunk_size", chunk_size)):
            _check_positive_int("MVAR", arg, value)
        eps = kwargs.get("norm_eps", 1e-6)
        self.mamba_norms = nn.ModuleList(nn.LayerNorm(self.width, eps=eps) for _ in range(self.depth))
        self.mambas = nn.ModuleList(
            Mamba2Mixer(self.width, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                        ngroups=ngroups, chunk_size=chunk_size) for _ in range(self.depth))
        self._init_mamba_weights()

    def _init_mamba_weights(self):
        # VAR's init reaches every Linear of the model; out_proj is a residual projection, shrunk with
        # depth as VAR shrinks attn.proj and the MLP's output
        std = (1.0 / self.width / 3) ** 0.5
        with torch.no_grad():
            for m in self.mambas:
                nn.init.trunc_normal_(m.in_proj.weight, std=std)
                nn.init.trunc_normal_(m.out_proj.weight, std=std)
                m.out_proj.weight.div_((2 * self.depth) ** 0.5)

    def _resolve_impl(self, owner, impl):
        return _attention.check_impl(owner, self.impl if impl is None else impl, _KERNEL_APIS)

    # ------------------------------------------------------------------------------------------
    # layers
    # ------------------------------------------------------------------------------------------

    def run_layers(self, x, block_cond, layout, impl, states=None):
        """x (B, L, C) laid out as `layout` through every layer. states: None (x is a whole sequence
        from its start; nothing returned but x) or a list with one entry per layer, None or the Mamba
        state after the previous piece: then x continues that sequence, and the list is updated in
        place with the state after x."""
        def attend(q, k, v, temperature):
            return _attention.sequence_attention(q, k, v, temperature, layout, self.pattern, impl, self._masks)
        for i, (norm, mamba, block) in enumerate(zip(self.mamba_norms, self.mambas, self.blocks)):
            if states is None:
                x = x + mamba(norm(x), impl)
            else:
                h, states[i] = mamba(norm(x), impl, state=states[i], return_state=True)
                x = x + h
            x = block(x, block_cond, attend, fused=impl == "kernels")
        return x

    def sequence_logits(self, x, cond, block_cond, layout, impl, states=None):
        return self.head(self.run_layers(x, block_cond, layout, impl, states), cond, fused=impl == "kernels")

    # ------------------------------------------------------------------------------------------
    # training and generation
    # ------------------------------------------------------------------------------------------

    def forward(self, tokens, labels, impl=None, state_carry=False):
        """Teacher-forced logits (B, L, vocab_size); tokens and labels as VAR.forward.

        state_carry=True computes the same logits scale by scale, each scale's forward starting from
        the Mamba states the previous scale left (what generate does), instead of one forward over
        the whole sequence.
        """
        owner = "MVAR.forward"
        impl = self._resolve_impl(owner, impl)
        tokens = self._check_tokens(owner, tokens)
        labels = self._check_labels(owner, labels, tokens.shape[0])
        if not isinstance(state_carry, bool):
            raise TypeError(f"{owner}: state_carry must be a bool, got {type(state_carry).__name__}")
        cond, block_cond = self.condition(self.drop_labels(labels))
        x = self.teacher_forcing_input(tokens, cond)
        if not state_carry:
            return self.sequence_logits(x, cond, block_cond, self.layout, impl)
        states = [None] * self.depth
        off = self.layout.offsets
        cond, block_cond = self.reused_conditions(cond, block_cond)  # projected once for all scales
        return torch.cat([self.sequence_logits(x[:, off[si]:off[si + 1]], cond, block_cond,
                                               _attention.single_scale_layout(n), impl, states)
                          for si, n in enumerate(self.layout.sizes)], dim=1)

    @torch.no_grad()
    def generate(self, labels, cfg=1.5, top_k=0, top_p=0.0, generator=None, *, cfg_ramp=True,
                 state_carry=True, impl=None):
        """Sample every scale in turn with classifier-free guidance (2B rows; guidance, cfg_ramp,
        top_k / top_p and the generator as VAR.generate).

        state_carry=True runs each scale once: every layer's Mamba starts from the conv and SSM
        states the previous scale left (no KV cache either: attention stays inside the scale).
        state_carry=False recomputes the whole prefix at every scale, as M-VAR's public code does
        (the baseline, and the definition the carried generation is tested against).
        Returns the list of per-scale (B, pn*pn) int64 token ids.
        """
        owner = "MVAR.generate"
        impl = self._resolve_impl(owner, impl)
        labels = self._check_labels(owner, labels)
        check_sampling_args(owner, cfg, top_k, top_p, generator)
        if not isinstance(state_carry, bool):
            raise TypeError(f"{owner}: state_carry must be a bool, got {type(state_carry).__name__}")
        if state_carry:
            states = [None] * self.depth

            def scale_logits(si, x, cond, block_cond):
                layout = _attention.single_scale_layout(self.layout.sizes[si])
                return self.sequence_logits(x, cond, block_cond, layout, impl, states)
        else:
            scale_logits = self.prefix_recompute(impl)
        return self.sample_scales(labels, cfg, top_k, top_p, generator, cfg_ramp, scale_logits)
