"""Chapter 4's stop: the three rungs of CLIP's loss agree, and what each costs."""
from __future__ import annotations

import math
import sys

from tiny_mm.tour.common import relative_error, verdict


def _autograd_rung(loss_fn, image, text, scale: float, device: str):
    """Loss and gradients of a torch rung on float32 copies of float64 inputs."""
    import torch

    leaves = [
        torch.tensor(x, dtype=torch.float32, device=device, requires_grad=True) for x in (image, text, scale)
    ]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.item(), *(t.grad.cpu().numpy() for t in leaves)


def run(quick: bool) -> bool:
    import numpy as np
    import torch

    import kernels
    from chapters.ch04_contrastive import reference as ref
    from tiny_mm import bench
    from tiny_mm.bench_contrastive import CONTRASTIVE
    from tiny_mm.contrastive import clip_loss

    rng = np.random.default_rng()  # fresh inputs each tour: the agreement is not a lucky draw
    ok = True
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device == "cuda"

    # 1. Three rungs, one answer. N and d deliberately not multiples of the kernel's blocks.
    n, d, scale = (37, 24, 1 / 0.07) if quick else (100, 48, 1 / 0.07)
    image = ref.l2_normalize(rng.standard_normal((n, d)))
    text = ref.l2_normalize(image + 0.5 * rng.standard_normal((n, d)))
    loss64 = ref.clip_loss(image, text, scale)
    grads64 = ref.clip_loss_grad(image, text, scale)
    print("The loss CLIP trains with, written three times: a NumPy reference (float64, gradients by")
    print("hand), the PyTorch loss (autograd) and a fused Triton kernel that never builds the N x N logits.")
    print()
    print(f"1. Three rungs, one answer (N = {n}, d = {d}, logit scale 1/0.07, fresh random pairs)")
    print(
        f"   NumPy float64 reference: loss = {loss64:.6f}  "
        f"(pairs it could not tell apart would score log N = {math.log(n):.3f})"
    )
    print(f"   {'rung':<30} {'loss':>9} {'d_image':>9} {'d_text':>9} {'d_scale':>9}  limit")
    for label, fn, limit in (
        ("PyTorch, float32", clip_loss, 1e-5),
        ("Triton, float32" + ("" if on_gpu else " (interpreter)"), kernels.clip_loss, 1e-3),
    ):
        loss, *grads = _autograd_rung(fn, image, text, scale, device)
        errors = [relative_error(loss, loss64)] + [relative_error(g, r) for g, r in zip(grads, grads64)]
        worst = max(errors)
        ok &= worst < limit
        cells = " ".join(f"{e:9.1e}" for e in errors)
        print(f"   {label:<30} {cells}  {limit:.0e} {verdict(worst, limit)}")
    print("   (relative errors ||rung - reference|| / ||reference|| against the float64 reference)")

    # 2. The hand-derived gradient against finite differences, through the L2 normalisation.
    gn, gd = 6, 5
    image_raw, text_raw = rng.standard_normal((gn, gd)), rng.standard_normal((gn, gd))
    hand = ref.clip_loss_raw_grad(image_raw, text_raw, scale)
    numeric = (
        ref.numerical_gradient(lambda x: ref.clip_loss_raw(x, text_raw, scale), image_raw),
        ref.numerical_gradient(lambda x: ref.clip_loss_raw(image_raw, x, scale), text_raw),
        ref.numerical_gradient(lambda x: ref.clip_loss_raw(image_raw, text_raw, float(x[0])), np.array([scale])),
    )
    errors = [relative_error(h, nm) for h, nm in zip(hand, numeric)]
    limit = 1e-6
    ok &= max(errors) < limit
    print()
    print(f"2. Gradient check: hand-derived gradient vs central finite differences (N = {gn}, d = {gd}, raw rows)")
    print(
        f"   d_image {errors[0]:.1e}   d_text {errors[1]:.1e}   d_scale {errors[2]:.1e}"
        f"   limit {limit:.0e} {verdict(max(errors), limit)}"
    )

    # 3. What each rung costs.
    cfg = bench.Config(
        points=(32, 64) if quick else (128, 512, 1024),
        dim=16 if quick else 256,
        dtype="float32",
        device=device,
        repeats=1 if quick else 3,
        warmup=0 if quick else 1,
        min_time_ms=50 if quick else 200,
        threads=1,  # one thread: other busy programs then barely disturb the figures
    )
    print()
    print(
        f"3. What each rung costs on this {'GPU' if on_gpu else 'CPU'} (d = {cfg.dim}, float32"
        f"{'' if on_gpu else ', one thread'}; the full sweep: tinymm bench contrastive)"
    )
    results = bench.run_sweep(CONTRASTIVE, cfg, progress=sys.stderr.isatty())
    print("   " + bench.format_table(CONTRASTIVE, cfg, results).replace("\n", "\n   "))
    ok &= all(m.ok for m in results)
    for rung in ("numpy", "pytorch"):  # the N^2 in the naive rungs' memory, read off the table
        points = [m for m in results if m.rung == rung and m.ok and m.peak_extra_bytes]
        if len(points) >= 2:
            a, b = points[-2], points[-1]
            print(
                f"   {rung}: peak extra memory x{b.peak_extra_bytes / a.peak_extra_bytes:.1f} from N = {a.point:,} "
                f"to N = {b.point:,} (N^2 predicts x{(b.point / a.point) ** 2:.0f}): it builds the N x N logits"
            )

    print()
    print(
        "What this showed: the NumPy reference, the PyTorch loss and the fused Triton kernel compute\n"
        "the same loss and gradients; the gradient derived by hand is right; the naive rungs' memory\n"
        "grows as N^2 because they build the N x N logits, which the kernel never does (it needs\n"
        "O(N*d) extra memory): at N = 32,768 one float32 N x N matrix alone is 4.3 GB."
    )
    return ok
