"""Chapter 2's stop: NumPy, PyTorch and Triton attention agree under every mask."""
from __future__ import annotations

from tiny_mm.tour.common import relative_error, verdict


def _attention_rung(attend, q, k, v, d_out, causal: bool, kv_lengths, device: str):
    """Output and (dq, dk, dv) of a torch attention rung, on float32 copies of float64 inputs."""
    import torch

    leaves = [torch.tensor(x, dtype=torch.float32, device=device, requires_grad=True) for x in (q, k, v)]
    lengths = None if kv_lengths is None else torch.tensor(kv_lengths, device=device)
    out = attend(*leaves, causal=causal, kv_lengths=lengths)  # (B, H, Lq, D)
    out.backward(torch.tensor(d_out, dtype=torch.float32, device=device))
    return out.detach().cpu().numpy(), [t.grad.cpu().numpy() for t in leaves]


def run(quick: bool) -> bool:
    import numpy as np
    import torch

    import kernels
    from chapters.ch02_attention import reference as ref
    from tiny_mm.attention import scaled_dot_product_attention

    rng = np.random.default_rng()  # fresh inputs each tour: the agreement is not a lucky draw
    ok = True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"

    # 1. Three rungs, one answer, under every mask. Lq != Lk (cross-attention), and
    # lengths that are not multiples of the kernel's blocks. One example's keys are all
    # padding (length 0): its rows see no key and must come out as zeros, never NaN.
    B, H, Lq, Lk, D = (2, 2, 13, 21, 16) if quick else (2, 3, 37, 53, 32)
    q, k, v, d_out = (rng.standard_normal((B, H, L, D)) for L in (Lq, Lk, Lk, Lq))
    lengths = np.array([Lk - 5, 0])  # example 0: the last 5 keys are padding; example 1: no key at all
    print("Attention, written three times: a NumPy reference (float64, backward by hand), the PyTorch")
    print("rung that builds the (Lq, Lk) matrix, and a Triton flash-attention kernel that never does.")
    print()
    print(f"1. Three rungs, one answer (B = {B}, H = {H}, Lq = {Lq} queries, Lk = {Lk} keys, D = {D}; fresh inputs)")
    print(f"   key lengths for the padding mask: {lengths.tolist()} (example 1 sees no key: its output must be 0)")
    print(f"   {'mask':<16} {'rung':<26} {'out':>8} {'dq':>8} {'dk':>8} {'dv':>8}  limit")
    rungs = (
        ("PyTorch, float32", scaled_dot_product_attention, 1e-5),
        ("Triton, float32" + ("" if on_gpu else " (interp.)"), kernels.attention, 1e-3),
    )
    for mask, causal, kv in (("none", False, None), ("causal", True, None), ("padding", False, lengths),
                             ("causal+padding", True, lengths)):
        out64 = ref.attention(q, k, v, causal=causal, kv_lengths=kv)
        grads64 = ref.attention_grad(q, k, v, d_out, causal=causal, kv_lengths=kv)
        for label, attend, limit in rungs:
            out, grads = _attention_rung(attend, q, k, v, d_out, causal, kv, device)
            errors = [relative_error(out, out64)] + [relative_error(g, r) for g, r in zip(grads, grads64)]
            empty_ok = True
            if kv is not None:  # rows with no visible key: exactly zero out and gradients, no NaN
                empty_ok = not np.any(out[1]) and not any(np.any(g[1]) for g in grads)
            worst = max(errors)
            ok &= worst < limit and empty_ok
            cells = " ".join(f"{e:8.1e}" for e in errors)
            judged = verdict(worst, limit) if empty_ok else "FAIL (a row with no key is not 0)"
            print(f"   {mask:<16} {label:<26} {cells}  {limit:.0e} {judged}")
    print("   (relative errors ||rung - reference|| / ||reference|| against the float64 reference;")
    print("    with padding, the example that sees no key was also checked to give exact zeros)")

    # 2. The hand-derived backward against central finite differences of <d_out, attention>.
    gq, gk, gd = 3, 4, 3
    q, k, v = (rng.standard_normal((1, 2, L, gd)) for L in (gq, gk, gk))
    d_out = rng.standard_normal((1, 2, gq, gd))
    kv = np.array([3])  # the last key is padding, and causal hides more: both masks in play

    def loss(q_, k_, v_):
        return float(np.sum(ref.attention(q_, k_, v_, causal=True, kv_lengths=kv) * d_out))

    hand = ref.attention_grad(q, k, v, d_out, causal=True, kv_lengths=kv)
    numeric = (
        ref.numerical_gradient(lambda x: loss(x, k, v), q),
        ref.numerical_gradient(lambda x: loss(q, x, v), k),
        ref.numerical_gradient(lambda x: loss(q, k, x), v),
    )
    errors = [relative_error(h, nm) for h, nm in zip(hand, numeric)]
    limit = 1e-6
    ok &= max(errors) < limit
    print()
    print(f"2. Gradient check: hand-derived backward vs central finite differences (Lq = {gq}, Lk = {gk}, "
          f"D = {gd}, causal + padding)")
    print(f"   dq {errors[0]:.1e}   dk {errors[1]:.1e}   dv {errors[2]:.1e}   limit {limit:.0e} "
          f"{verdict(max(errors), limit)}")

    print()
    print(
        "What this showed: the NumPy reference, the PyTorch rung and the flash-attention kernel agree,\n"
        "forward and backward, for cross-attention (Lq != Lk) under no mask, a causal mask, key padding\n"
        "and both; a query that sees no key gives zeros, not NaN; and the backward derived by hand is\n"
        "right. The kernel keeps only O and one log-sum-exp per row for its backward, never the\n"
        "(Lq, Lk) matrices: `tinymm bench attention` measures what that saves."
    )
    return ok
