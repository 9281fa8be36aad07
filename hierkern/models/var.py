"""VAR: class-conditional next-scale prediction with block-causal attention (a token of scale i sees
every token of scales <= i) and scale-by-scale generation over a per-layer KV cache."""
import torch

from . import _attention
from ._next_scale import NextScaleTransformer
from ._sampling import check_sampling_args


class VAR(NextScaleTransformer):
    """VAR (Tian et al. 2024) with random weights and token ids in place of a VQ-VAE.

    VAR(vocab_size=4096, num_classes=1000, depth=4, patch_nums=VAR_256, width=64*depth,
        heads=depth, mlp_ratio=4.0, shared_aln=False, code_dim=32, cond_drop_rate=0.1, norm_eps=1e-6,
        impl="kernels")
    VAR.preset("d16" | "d20" | "d24" | "d30", **overrides)

    impl="reference" runs VAR's public code path (dense additive mask + SDPA in training; torch.cat
    KV cache in generation), the eager baseline; impl="kernels" runs hierkern.next_scale_attention and
    hierkern.KVCache + hierkern.cached_attention. forward/generate take impl=None to use the model's.
    """

    pattern = "causal"

    def forward(self, tokens, labels, impl=None):
        """Teacher-forced logits.

        tokens: ground-truth ids of every scale, either a list of per-scale (B, pn*pn) integer tensors
            or one (B, L) tensor with the scales laid out one after another (L = sum pn^2).
        labels: (B,) class ids in [0, num_classes]; in training mode a fraction cond_drop_rate of them
            is replaced by the null class num_classes.
        Returns (B, L, vocab_size) logits; position j predicts token j.
        """
        owner = "VAR.forward"
        impl = self._resolve_impl(owner, impl)
        tokens = self._check_tokens(owner, tokens)
        labels = self._check_labels(owner, labels, tokens.shape[0])
        cond, block_cond = self.condition(self.drop_labels(labels))
        x = self.teacher_forcing_input(tokens, cond)
        return self.sequence_logits(x, cond, block_cond, self.layout, impl)

    @torch.no_grad()
    def generate(self, labels, cfg=1.5, top_k=0, top_p=0.0, generator=None, *, cfg_ramp=True,
                 use_cache=True, impl=None):
        """Sample every scale in turn with classifier-free guidance.

        The batch is doubled (rows of `labels`, then null-class rows); at scale i the guided logits are
        (1 + r) * cond - r * uncond with r = cfg * i / (num_scales - 1) when cfg_ramp (VAR's linear
        ramp) or r = cfg. Tokens are drawn with the generator (one uniform per token) after top_k /
        top_p filtering (0 disables either; top_k=1 is greedy). The generator must be on the model's
        device.

        use_cache=True runs each scale once over a per-layer KV cache holding every earlier scale;
        use_cache=False recomputes the whole prefix with the block-causal mask at every scale (the
        cache-free definition, for tests).
        Returns the list of per-scale (B, pn*pn) int64 token ids.
        """
        owner = "VAR.generate"
        impl = self._resolve_impl(owner, impl)
        labels = self._check_labels(owner, labels)
        check_sampling_args(owner, cfg, top_k, top_p, generator)
        if use_cache:
            caches = []

            def scale_logits(si, x, cond, block_cond):
                if not caches:
                    caches.extend(_attention.make_kv_cache(impl, x.shape[0], self.layout.L, self.heads,
                                                           self.width // self.heads, x.dtype, x.device)
                                  for _ in self.blocks)
                return self.head(self.run_blocks(x, block_cond, lambda i: caches[i].attend, impl), cond,
                                 fused=impl == "kernels")
        else:
            scale_logits = self.prefix_recompute(impl)
        return self.sample_scales(labels, cfg, top_k, top_p, generator, cfg_ramp, scale_logits)
