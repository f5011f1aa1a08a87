"""Chapter 7's stop: Fourier features and a Perceiver IO pass against NumPy, its cost against
torch's FLOP counter, linear against quadratic scaling, and a Perceiver trained on raw pixels."""
from __future__ import annotations

from tiny_mm.tour.common import relative_error, verdict


def _weights(module, prefix: str) -> dict:
    return {k[len(prefix):]: v.detach().double().numpy()
            for k, v in module.state_dict().items() if k.startswith(prefix)}


def run(quick: bool) -> bool:
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from chapters.ch07_perceiver import reference as ref
    from tiny_mm.perceiver import PerceiverConfig, PerceiverIO, fourier_features, train_pixel_classifier

    rng = np.random.default_rng()  # fresh sizes and weights each tour
    ok = True
    print("N learned latents read M inputs by cross-attention (cost ~ N M), think among themselves")
    print("(~ N^2 per block, whatever M is), and O output queries read the latents (~ O N).")
    print()

    # 1. Fourier position features.
    H, W, K = int(rng.integers(5, 30)), int(rng.integers(5, 30)), int(rng.integers(2, 9))
    error, limit = relative_error(fourier_features((H, W), K).numpy(), ref.fourier_features((H, W), K)), 1e-6
    ok &= error < limit
    print(f"1. Fourier features of a {H} x {W} grid, K = {K}: {2 * (2 * K + 1)} per pixel = d (2K + 1)")
    print(f"   torch float32 vs NumPy float64: relative error {error:.1e}  limit {limit:.0e} {verdict(error, limit)}")

    # 2. A Perceiver IO pass against the NumPy blocks, same random weights.
    C, M, O, E, N, D = 7, int(rng.integers(20, 80)), int(rng.integers(3, 20)), 12, 6, 16
    model = PerceiverIO(PerceiverConfig(input_dim=C, num_latents=N, width=D, depth=2, heads=2), E, 5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy(0.3 * rng.standard_normal(tuple(p.shape))))
    inputs, queries = rng.standard_normal((2, M, C)), rng.standard_normal((2, O, E))
    with torch.no_grad():
        out = model(torch.from_numpy(inputs).float(), torch.from_numpy(queries).float()).numpy()  # (2, O, 5)
    z = np.broadcast_to(_weights(model, "encoder.")["latents"], (2, N, D))  # (2, N, D)
    z = ref.cross_attention_block(z, inputs, _weights(model, "encoder.cross.0."), 1)
    for j in range(2):
        z = ref.self_attention_block(z, _weights(model, f"encoder.latent.0.{j}."), 2)
    decoded = ref.cross_attention_block(queries, z, _weights(model, "decoder."), 1)  # (2, O, E)
    p = _weights(model, "")
    expected = ref.layer_norm(decoded, p["ln_out.weight"], p["ln_out.bias"]) @ p["head.weight"].T + p["head.bias"]
    error, limit = relative_error(out, expected), 1e-5
    ok &= error < limit
    print()
    print(f"2. Perceiver IO, M = {M} inputs, N = {N} latents, O = {O} queries: torch float32 vs NumPy float64")
    print(f"   relative error {error:.1e}  limit {limit:.0e} {verdict(error, limit)}")

    # 3. The FLOP formula against what torch counts, and what scaling means.
    with FlopCounterMode(display=False) as counter:
        model(torch.from_numpy(inputs).float(), torch.from_numpy(queries).float())
    formula = ref.perceiver_io_flops(M, O, N, D, 2, input_dim=C, query_dim=E, output_dim=5, batch=2)
    same = counter.get_total_flops() == formula
    ok &= same
    print()
    print(f"3. FLOPs of that pass: formula {formula:,}, FlopCounterMode {counter.get_total_flops():,} "
          f"{'ok' if same else 'FAIL'}")
    sizes = dict(num_latents=256, width=256, depth=6, input_dim=29, query_dim=256, output_dim=10)
    print("   Perceiver IO (256 latents, width 256, 6 blocks) against a plain 6-block encoder of width 256:")
    print(f"   {'inputs M':>9} {'Perceiver IO GFLOPs':>20} {'plain encoder GFLOPs':>21}")
    for m in (256, 1024, 4096, 16384):
        io = ref.perceiver_io_flops(m, 1, **sizes)
        plain = ref.transformer_encoder_flops(m, 256, 6, input_dim=29)
        print(f"   {m:>9,} {io / 1e9:>20.2f} {plain / 1e9:>21.2f}")
    doubled = {f"M = {m:,}, O = {o:,}": ref.perceiver_io_flops(2 * m, 2 * o, **sizes)
               / ref.perceiver_io_flops(m, o, **sizes) for m, o in ((1024, 16), (50_176, 50_176))}
    print("   Doubling inputs and outputs (exercise 6): "
          + ", ".join(f"{where}: x{r:.2f}" for where, r in doubled.items()) + " (under 2: the latents stay)")

    # 4. Training from raw pixels.
    print()
    if quick:
        print("4. (skipped with --quick) a Perceiver trained on raw pixels: `tinymm tour --only perceiver`")
        return ok
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two that wait on each other
    try:
        run_ = train_pixel_classifier()
    finally:
        torch.set_num_threads(threads)
    above = run_.test_accuracy > 3 * run_.chance
    ok &= above
    print(f"4. A Perceiver ({sum(q.numel() for q in run_.model.parameters()):,} parameters) names where the "
          f"shape is in a {run_.test_images.shape[-1]} x {run_.test_images.shape[-1]} image from its raw pixels")
    print(f"   (each pixel = RGB + Fourier features, no patches): {len(run_.losses)} steps in {run_.seconds:.0f} s,")
    print(f"   held-out accuracy {run_.test_accuracy:.1%} (chance {run_.chance:.1%}) "
          f"{'ok' if above else 'FAIL (expected well above chance)'}")
    return ok
