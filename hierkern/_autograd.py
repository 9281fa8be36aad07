"""Eager autograd for the public wrappers around hierkern's custom ops.

Every op keeps its torch.library.register_autograd formula (opcheck, torch.compile and direct
torch.ops callers go through it). In eager mode the public wrappers call the op through an
autograd.Function built from the same setup_context / backward functions instead: torch.library's
generic autograd wrapper rebuilds the schema's argument list on every call (utils.fill_defaults) and
redispatches, which made a small differentiable cached_attention call 15-40% slower in host time on
this project's 2-core CPU machine (interleaved A/B runs; on a GPU that is time the kernels wait for)."""
import torch


class _OpFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, setup_context, backward, *inputs):
        # Grad mode is off here, so the op's registered autograd kernel only redispatches.
        output = op(*inputs)
        setup_context(ctx, inputs, output)
        ctx.hierkern_backward = backward
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, None, None) + tuple(ctx.hierkern_backward(ctx, *grads))


def call_op(op, setup_context, backward, *inputs):
    """op(*inputs), differentiable with the same setup_context / backward as its registered formula."""
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)):
        return _OpFunction.apply(op, setup_context, backward, *inputs)
    return op(*inputs)
