"""Eager autograd for the public wrappers around hierkern's custom ops.

Every op keeps its torch.library.register_autograd formula (opcheck, torch.compile and direct
torch.ops callers go through it). In eager mode the public wrappers call the op through an
autograd.Function built from the same setup_context / backward functions instead: torch.library's
generic autograd wrapper rebuilds the schema's argument list on every call (utils.fill_defaults) and
redispatches, which made a small differentiable cached_attention call 15-40% slower in host time on
this project's 2-core CPU machine (interleaved A/B runs; on a GPU that is time the kernels wait for).

For the same reason a plain eager call on plain tensors skips the dispatcher altogether: `eager`
(the op's Python kernel, e.g. a Triton launcher) or the op's C++ kernel below the Autograd key.
Through torch.ops the call also passes the registered autograd kernel's redispatch and
torch._dynamo's disable wrapper, about 25 us of Python per call; decode-like calls (one scale of a
generation step) launch kernels of that order. Tensor subclasses (FakeTensor, functional tensors),
dispatch modes and torch.compile tracing still go through torch.ops, which is what they need."""
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


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(inputs) -> bool:
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(t) in _PLAIN for t in inputs if isinstance(t, torch.Tensor))


_BELOW = {}


def below_autograd(op):
    """op's kernel for the inputs' device, called without the Autograd key (the C++ ops' eager path:
    the caller handles autograd). One function per op."""
    fn = _BELOW.get(op)
    if fn is None:
        overload = op.default

        def fn(*inputs):
            with torch._C._AutoDispatchBelowAutograd():
                return overload(*inputs)
        _BELOW[op] = fn
    return fn


def _choose(op, eager, inputs):
    return eager if eager is not None and _plain_eager(inputs) else op


def dispatch(op, eager, *inputs):
    """op(*inputs), through `eager` (if given) when nothing needs the dispatcher (backward passes)."""
    return _choose(op, eager, inputs)(*inputs)


def call_op(op, setup_context, backward, *inputs, eager=None):
    """op(*inputs), differentiable with the same setup_context / backward as its registered formula.
    eager: a function equivalent to op for plain eager tensors (its Python kernel, or
    below_autograd(op)), used when nothing needs the dispatcher."""
    fn = _choose(op, eager, inputs)
    if (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)):
        return _OpFunction.apply(fn, setup_context, backward, *inputs)
    return fn(*inputs)
