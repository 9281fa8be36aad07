"""Helpers shared by the next-scale model tests (VAR / HMAR and M-VAR)."""
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
