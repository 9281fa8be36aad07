"""Helpers shared by the reference-model tests."""
import torch


def tokens_labels(model, batch=2, seed=1):
    """Random token ids of the whole multi-scale sequence and class labels."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, model.vocab_size, (batch, model.layout.L), generator=g),
            torch.randint(0, model.num_classes, (batch,), generator=g))


def logits_and_grads(model, tokens, labels, weight, **kw):
    """The logits and every parameter's gradient of sum(logits * weight)."""
    model.zero_grad()
    logits = model(tokens, labels, **kw)
    (logits * weight.to(logits.dtype)).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def loss_and_grads(model, tokens, labels, **kw):
    """model.loss(tokens, labels, **kw) and every parameter's gradient of it."""
    model.zero_grad()
    loss = model.loss(tokens, labels, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def randomize(model, seed=0):
    """Order-one weights everywhere, so attention visibly shapes the outputs (the default inits
    start blocks near the identity). Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def assert_greedy_generation_kernels_equals_reference(model):
    """Greedy (top_k=1) guided generation gives the same tokens with impl='reference' and 'kernels'."""
    labels = torch.tensor([1, 4, 9])
    ref = model.generate(labels, cfg=1.5, top_k=1, impl="reference")
    ker = model.generate(labels, cfg=1.5, top_k=1, impl="kernels")
    for a, b in zip(ref, ker):
        assert torch.equal(a, b)


def assert_greedy_generation_matches_forward(model, impl):
    """Greedy unguided generation (top_k=1, cfg=0) picks, at every scale, the argmax of the teacher-
    forced forward's logits on the tokens it generated: the generation loop (its caches or carried
    states, the class condition projected once per generation) computes the function forward does."""
    labels = torch.tensor([1, 4])
    ids = model.generate(labels, cfg=0.0, top_k=1, impl=impl)
    tokens = torch.cat([t.flatten(1) for t in ids], dim=1)
    with torch.no_grad():
        logits = model(tokens, labels, impl=impl)
    top2 = logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-4 * top2[..., 0].abs().clamp_min(1.0)  # no near-tie
    assert clear.float().mean() > 0.9
    assert torch.equal(logits.argmax(-1)[clear], tokens[clear])
