"""`tinymm tour` (what `make demo` runs): each chapter's core result, recomputed here, on CPU.

The tour is a list of `Stop`s, one per chapter that has something to show.
A stop prints what it computed, checks it, and says which chapter explains
it; it returns True when every check held. Later chapters add their stop to
`STOPS`, in book order, and nothing else changes. The stops so far:

    fusion       chapter 1: the cost formulas against torch's FLOP counter; the 196 x 128 claim
    attention    chapter 2: NumPy, PyTorch and Triton attention agree under every mask; the
                 hand-derived backward against finite differences
    contrastive  chapter 4: the three rungs of CLIP's loss agree; their cost

    tinymm tour                 # every stop (about a minute on a 2-core CPU)
    tinymm tour --quick         # the same checks at toy sizes (seconds)
    tinymm tour --only attention,contrastive
    tinymm tour --list
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["Stop", "STOPS", "relative_error", "main"]


@dataclass(frozen=True)
class Stop:
    name: str  # for --only
    title: str
    chapter: str  # the page to read
    run: Callable[[bool], bool]  # run(quick) prints its findings, returns True if all checks held


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when out has a NaN, so a NaN never passes)."""
    import numpy as np

    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(out)):
        return math.inf
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def _verdict(error: float, limit: float) -> str:
    return "ok" if error < limit else "FAIL"


# ---------------------------------------------------------------------------
# Chapter 1: what each fusion strategy costs


def _counted_flops(model, image, text) -> tuple[int, int]:
    """Matmul FLOPs of a forward, and of a forward + backward, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as forward_only:
        model(image, text)
    with FlopCounterMode(display=False) as training:
        model(image, text).sum().backward()
    return forward_only.get_total_flops(), training.get_total_flops()


def _fusion_stop(quick: bool) -> bool:
    import numpy as np
    import torch

    from tiny_mm import counting
    from tiny_mm.fusion import CrossModalFusion, EarlyFusion, FusionConfig, LateFusion

    rng = np.random.default_rng()  # a fresh configuration each tour: the formulas hold for all
    ok = True

    # 1. The formulas against torch's own FLOP counter, on freshly built modules.
    heads = int(rng.choice([2, 4]))
    layers = int(rng.integers(1, 3))
    width = heads * int(rng.integers(4, 9 if quick else 17))
    n_image = int(rng.integers(5, 17 if quick else 50))
    n_text, batch = int(rng.integers(3, 13)), int(rng.integers(1, 4))
    config = FusionConfig(layers=layers, width=width, heads=heads)
    image = torch.randn(batch, n_image, width)  # (B, N, d)
    text = torch.randn(batch, n_text, width)  # (B, M, d)
    print("Three ways to let image and text tokens meet (early: one encoder over both; late: two encoders,")
    print("pooled outputs fused; cross: two encoders plus text-to-image cross-attention), and exact")
    print("formulas for what each costs.")
    print()
    print(f"1. Formulas vs torch.utils.flop_counter.FlopCounterMode (random configuration: L = {layers}, "
          f"d = {width}, h = {heads},")
    print(f"   N = {n_image} image tokens, M = {n_text} text tokens, batch {batch})")
    print(f"   {'strategy':<8} {'forward FLOPs':>14} {'counted':>14} {'training FLOPs':>15} {'counted':>14} "
          f"{'params':>9} {'counted':>9}")
    sizes = dict(batch=batch)
    for name, model_class, formula in (
        ("early", EarlyFusion, counting.early_fusion),
        ("late", LateFusion, counting.late_fusion),
        ("cross", CrossModalFusion, counting.cross_modal_fusion),
    ):
        torch.manual_seed(int(rng.integers(2**31)))
        model = model_class(config)
        cost = formula(layers, width, heads, n_image, n_text, **sizes)
        forward, training = _counted_flops(model, image, text)
        params = sum(p.numel() for p in model.parameters())
        same = (cost.flops_forward, cost.flops_training, cost.params) == (forward, training, params)
        ok &= same
        print(f"   {name:<8} {cost.flops_forward:>14,} {forward:>14,} {cost.flops_training:>15,} {training:>14,} "
              f"{cost.params:>9,} {params:>9,}  {'ok' if same else 'FAIL'}")
    print("   (every count must match exactly: the formulas count what FlopCounterMode counts, 2mnk per matmul)")

    # 2. The textbook claim: 196 patches and 128 text tokens.
    N, M, d, h = 196, 128, 768, 12  # ViT-B/16 at 224 px and a 128-token caption; width and heads of ViT-B
    cross = counting.attention_scores(M, N)
    early = counting.attention_scores(N + M, N + M)
    claim_ok = cross == M * N == 25_088 and early == (N + M) ** 2 == 104_976
    ok &= claim_ok
    print()
    print(f"2. The claim, for N = {N} patches and M = {M} text tokens, per head and example:")
    print(f"   cross-attention scores  M x N = {cross:>9,}   early fusion (N + M)^2 = {early:>9,}   "
          f"ratio {early / cross:.2f}x  {'ok' if claim_ok else 'FAIL'}")
    print(f"   What it means for a whole layer (d = {d}, h = {h}, MLP 4d; forward FLOPs per example):")
    layer = {s: counting.fusion_layer(s, d, h, N, M) for s in ("early", "late", "cross")}
    cross_block = counting.cross_attention_block(M, N, d, h)
    rows = [(f"{s} layer", c) for s, c in layer.items()] + [("  its cross-attention block", cross_block)]
    print(f"   {'':<28} {'GFLOPs':>7} {'scores/head':>12} {'score matmuls share':>20}")
    for label, c in rows:
        score_flops = 4 * c.score_entries * (d // h)  # QK^T and PV: 2 * Dh multiply-adds per entry each
        print(f"   {label:<28} {c.flops_forward / 1e9:>7.3f} {c.score_entries // h:>12,} "
              f"{score_flops / c.flops_forward:>19.0%}")
    whole = layer["early"].flops_forward / cross_block.flops_forward
    cross_vs_early = layer["cross"].flops_forward / layer["early"].flops_forward
    print(f"   The {early / cross:.1f}x holds for the score matrices (QK^T, softmax, PV) alone. A cross-attention")
    print(f"   block costs {whole:.1f}x less than an early-fusion layer, not {early / cross:.1f}x: its projections and")
    print("   MLP grow linearly with the tokens and dominate at d = 768. Nor does cross-attention replace")
    print(f"   self-attention: a cross layer also runs both encoders' blocks, {cross_vs_early:.2f}x an early layer's")
    print("   FLOPs here. The 4x is about the interaction matrices (and their memory), not a 4x cheaper model.")
    print("   (N + M)^2 / (N M) = 2 + N/M + M/N is at least 4 for any N and M; what grows with the token")
    print("   counts is the scores' share of a layer: quadratic in the tokens, the rest linear.")
    print()
    print("What this showed: exact cost formulas for the three strategies, matching torch's FLOP counter")
    print("on a configuration drawn just now; and the 196 x 128 claim, where it holds and where it does not.")
    return ok


# ---------------------------------------------------------------------------
# Chapter 2: attention


def _attention_rung(attend, q, k, v, d_out, causal: bool, kv_lengths, device: str):
    """Output and (dq, dk, dv) of a torch attention rung, on float32 copies of float64 inputs."""
    import torch

    leaves = [torch.tensor(x, dtype=torch.float32, device=device, requires_grad=True) for x in (q, k, v)]
    lengths = None if kv_lengths is None else torch.tensor(kv_lengths, device=device)
    out = attend(*leaves, causal=causal, kv_lengths=lengths)  # (B, H, Lq, D)
    out.backward(torch.tensor(d_out, dtype=torch.float32, device=device))
    return out.detach().cpu().numpy(), [t.grad.cpu().numpy() for t in leaves]


def _attention_stop(quick: bool) -> bool:
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
            verdict = _verdict(worst, limit) if empty_ok else "FAIL (a row with no key is not 0)"
            print(f"   {mask:<16} {label:<26} {cells}  {limit:.0e} {verdict}")
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
          f"{_verdict(max(errors), limit)}")

    print()
    print(
        "What this showed: the NumPy reference, the PyTorch rung and the flash-attention kernel agree,\n"
        "forward and backward, for cross-attention (Lq != Lk) under no mask, a causal mask, key padding\n"
        "and both; a query that sees no key gives zeros, not NaN; and the backward derived by hand is\n"
        "right. The kernel keeps only O and one log-sum-exp per row for its backward, never the\n"
        "(Lq, Lk) matrices: `tinymm bench attention` measures what that saves."
    )
    return ok


# ---------------------------------------------------------------------------
# Chapter 4: the contrastive loss


def _autograd_rung(loss_fn, image, text, scale: float, device: str):
    """Loss and gradients of a torch rung on float32 copies of float64 inputs."""
    import torch

    leaves = [
        torch.tensor(x, dtype=torch.float32, device=device, requires_grad=True) for x in (image, text, scale)
    ]
    loss = loss_fn(*leaves)
    loss.backward()
    return loss.item(), *(t.grad.cpu().numpy() for t in leaves)


def _contrastive_stop(quick: bool) -> bool:
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
        print(f"   {label:<30} {cells}  {limit:.0e} {_verdict(worst, limit)}")
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
        f"   limit {limit:.0e} {_verdict(max(errors), limit)}"
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


STOPS: list[Stop] = [
    Stop(
        name="fusion",
        title="What each fusion strategy costs",
        chapter="chapters/ch01_fusion/README.md (notebook: chapters/ch01_fusion/notebook.py)",
        run=_fusion_stop,
    ),
    Stop(
        name="attention",
        title="Attention, three ways, under every mask",
        chapter="chapters/ch02_attention/README.md (notebook: chapters/ch02_attention/notebook.py)",
        run=_attention_stop,
    ),
    Stop(
        name="contrastive",
        title="CLIP's contrastive loss, three ways",
        chapter="chapters/ch04_contrastive/README.md (notebook: chapters/ch04_contrastive/notebook.py)",
        run=_contrastive_stop,
    ),
]


# ---------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinymm tour", description="Each chapter's core result, recomputed here.")
    parser.add_argument("--quick", action="store_true", help="the same checks at toy sizes (a few seconds)")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these stops (see --list)")
    parser.add_argument("--list", action="store_true", help="list the stops and exit")
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)

    if args.list:
        for stop in STOPS:
            print(f"{stop.name:<14} {stop.title}  ({stop.chapter.split()[0]})")
        return 0
    stops = STOPS
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in {s.name for s in STOPS}]
        if unknown or not wanted:
            print(
                f"tinymm tour: unknown stop(s) {unknown or wanted}; choose from {', '.join(s.name for s in STOPS)}",
                file=sys.stderr,
            )
            return 2
        stops = [s for s in STOPS if s.name in wanted]

    # Before any stop: torch imports Triton behind the scenes (FlopCounterMode does), and on a
    # machine without CUDA the kernels need Triton imported in interpreter mode, which
    # `kernels` arranges only if it comes first (see kernels/__init__.py).
    import kernels  # noqa: F401

    print("tinymm tour: each stop recomputes a chapter's core result on this machine and checks it.")
    start = time.perf_counter()
    passed = 0
    for i, stop in enumerate(stops, 1):
        print()
        print(f"== Stop {i} of {len(stops)}: {stop.title} ==")
        try:
            ok = stop.run(args.quick)
        except Exception as err:  # a broken stop is reported, and the tour goes on
            print(f"   this stop failed: {type(err).__name__}: {err}")
            ok = False
        passed += ok
        print(f"-> {'all checks held' if ok else 'SOME CHECKS FAILED'}. Read: {stop.chapter}")
    print()
    print(
        f"Tour done in {time.perf_counter() - start:.0f} s: {passed} of {len(stops)} stop(s) checked out. "
        "Next: `make test`, `tinymm grade ex01`, `tinymm bench attention`, `tinymm bench contrastive`"
        f"{'' if _on_path('tinymm') else ' (tinymm lives in .venv/bin: run `source .venv/bin/activate` first)'}."
    )
    return 0 if passed == len(stops) else 1


def _on_path(command: str) -> bool:
    """Whether a shell would find `command`, i.e. the venv is active or installed globally."""
    import shutil

    return shutil.which(command) is not None
