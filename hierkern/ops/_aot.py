"""Ahead-of-time kernel entries for tests/static_gpu_check.py. Every Triton module's aot_configs()
builds its entries here and says, per runtime argument, how a real call types it (its `classify`)."""

UNIT = "unit"  # classify's answer for a stride triton specialises to the constant 1 on real calls


def aot_entry(name, kernel, constexprs, classify, *, num_warps, num_stages=1, uses_dot, **extra):
    """One entry of aot_configs(): name, kernel (the @triton.jit function), signature (argument ->
    triton type, "constexpr" for compile-time arguments), constexprs, divisible_by_16, num_warps,
    num_stages, uses_dot, and each `extra` key (wgmma_exempt, exempt, archs) whose value is not None.

    classify(arg) for each runtime argument: UNIT, or (triton type, divisible) with divisible true
    when a real call's value is a multiple of 16 (pointers of torch allocations, strides that are
    multiples of head_dim), which triton marks and uses to vectorise loads."""
    signature, divisible, constexprs = {}, [], dict(constexprs)
    for param in kernel.params:
        arg = param.name
        if param.is_constexpr:
            signature[arg] = "constexpr"
            continue
        kind = classify(arg)
        if kind == UNIT:
            signature[arg] = "constexpr"
            constexprs[arg] = 1
            continue
        signature[arg], div = kind
        if div:
            divisible.append(arg)
    entry = {"name": name, "kernel": kernel, "signature": signature, "constexprs": constexprs,
             "divisible_by_16": divisible, "num_warps": num_warps, "num_stages": num_stages, "uses_dot": uses_dot}
    entry.update({k: v for k, v in extra.items() if v is not None})
    return entry
