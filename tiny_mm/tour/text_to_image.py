"""Chapter 11's stop: vector quantisation, the token sampler, DDIM and the denoiser against the NumPy
reference; then the chapter's generation run, read from its results file."""
from __future__ import annotations

from tiny_mm.tour.common import relative_error, verdict

def run(quick: bool) -> bool:
    import numpy as np
    import torch

    from chapters.ch11_text_to_image import reference as ref

    rng = np.random.default_rng()  # fresh sizes and inputs each tour
    print("Two ways from a caption to an image: write the image as codebook tokens after the caption")
    print("(DALL-E 1), or start from noise and remove it step by step, reading the caption through")
    print("cross-attention (latent diffusion, as in Stable Diffusion).")
    print()
    ok = _quantiser(rng, ref)
    ok &= _sampler(rng, ref)
    ok &= _ddim(rng, ref)
    ok &= _denoiser(rng, ref)
    ok &= _res_block(rng, ref)
    ok &= _generate(quick)
    print()
    print("What this showed: the tokenizer's straight-through gradients, the top-k sampler, DDIM and")
    print("the text-reading denoiser and the U-Net's residual block compute what the chapter's NumPy")
    print("reference computes.")
    print("`tinymm train text-to-image` trains both generators and scores them with a CLIP.")
    return ok


def _quantiser(rng, ref) -> bool:
    import torch

    from tiny_mm.vq import VectorQuantizer

    K, D, N = int(rng.integers(5, 40)), int(rng.integers(2, 9)), int(rng.integers(10, 60))
    vq = VectorQuantizer(K, D).double()
    with torch.no_grad():
        vq.codebook.copy_(torch.from_numpy(rng.standard_normal((K, D))))
    z_e = torch.from_numpy(rng.standard_normal((1, N, D))).requires_grad_()
    upstream = rng.standard_normal((N, D))  # the decoder's gradient with respect to z_q
    z_q, codes, loss = vq(z_e)
    ((z_q[0] * torch.from_numpy(upstream)).sum() + loss).backward()
    grad_z, grad_book = ref.vq_grads(z_e.detach()[0].numpy(), vq.codebook.detach().numpy(), upstream)
    ref_codes, _ = ref.quantize(z_e.detach()[0].numpy(), vq.codebook.detach().numpy())
    error = max(relative_error(z_e.grad[0].numpy(), grad_z), relative_error(vq.codebook.grad.numpy(), grad_book))
    same = bool((codes[0].numpy() == ref_codes).all())
    print(f"1. Vector quantisation, {N} vectors of {D} numbers, {K} codes: nearest codes equal the reference "
          f"{'ok' if same else 'FAIL'}")
    print(f"   straight-through + codebook + commitment gradients vs the hand-derived ones: "
          f"relative error {error:.1e}  limit 1e-10 {verdict(error, 1e-10)}")
    return same and error < 1e-10


def _sampler(rng, ref) -> bool:
    import numpy as np
    import torch

    from tiny_mm.dalle import next_token_probs

    V = int(rng.integers(8, 70))
    logits = rng.standard_normal((4, V)) * 3
    worst = 0.0
    for temperature, top_k in ((1.0, None), (0.5, 5), (2.0, 1), (0.8, V)):
        probs = next_token_probs(torch.from_numpy(logits), temperature, top_k).numpy()
        expected = np.stack([ref.next_token_distribution(row, temperature, top_k) for row in logits])
        worst = max(worst, relative_error(probs, expected))
    print()
    print(f"2. The next-token distribution (temperature, top-k) over {V} codes, four settings: "
          f"relative error {worst:.1e}  limit 1e-12 {verdict(worst, 1e-12)}")
    return worst < 1e-12


def _ddim(rng, ref) -> bool:
    import torch

    from tiny_mm.diffusion import NoiseSchedule, sample

    schedule = NoiseSchedule(200, "cosine")
    x0 = torch.from_numpy(rng.uniform(-1, 1, size=(2, 16, 4)))
    abar = schedule.alphas_cumprod

    def oracle(x_t, t, cond):  # knows x0: the exact noise of x_t
        a = abar[t].view(-1, 1, 1)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    worst = 0.0
    for steps in (200, 20, 3):
        out = sample(oracle, x0.shape, schedule, steps=steps, method="ddim", dtype=torch.float64,
                     generator=torch.Generator().manual_seed(0))
        worst = max(worst, relative_error(out.numpy(), x0.numpy()))
    betas = ref.cosine_betas(200)
    same_schedule = relative_error(abar.numpy(), ref.alphas_cumprod(betas))
    print()
    print("3. DDIM (eta = 0) with an oracle that knows the clean latents, from 200, 20 and 3 steps:")
    print(f"   ends on them: relative error {worst:.1e}  limit 1e-10 {verdict(worst, 1e-10)}; "
          f"the cosine schedule vs NumPy {same_schedule:.1e} {verdict(same_schedule, 1e-12)}")
    return worst < 1e-10 and same_schedule < 1e-12


def _denoiser(rng, ref) -> bool:
    import numpy as np
    import torch

    from tiny_mm.denoiser import DenoiserBlock

    d, e, h, N, T = 16, 12, 4, int(rng.integers(4, 20)), int(rng.integers(3, 9))
    block = DenoiserBlock(d, h, e).double()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.from_numpy(0.3 * rng.standard_normal(tuple(p.shape))))
    x = rng.standard_normal((2, N, d))
    text = rng.standard_normal((2, T, e))
    lengths = np.array([int(rng.integers(1, T + 1)), T])
    with torch.no_grad():
        out = block(torch.from_numpy(x), torch.from_numpy(text), torch.from_numpy(lengths)).numpy()
    weights = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    error = relative_error(out, ref.denoiser_block(x, text, lengths, weights, h))
    print()
    print(f"4. One denoiser block ({N} latent tokens read each other, then the {lengths[0]} and {T} words of two")
    print(f"   captions): torch vs NumPy float64, relative error {error:.1e}  limit 1e-10 {verdict(error, 1e-10)}")
    return error < 1e-10


def _res_block(rng, ref) -> bool:
    import numpy as np
    import torch

    from tiny_mm.unet import ResBlock

    c_in, c_out, E, S = 8, int(rng.choice([8, 12])), 10, int(rng.integers(3, 9))
    block = ResBlock(c_in, c_out, E, groups=4).double()
    with torch.no_grad():
        for p in block.parameters():  # every weight random, the zero-initialised conv_2 too
            p.copy_(torch.from_numpy(0.3 * rng.standard_normal(tuple(p.shape))))
    x, emb = rng.standard_normal((2, c_in, S, S)), rng.standard_normal((2, E))
    with torch.no_grad():
        out = block(torch.from_numpy(x), torch.from_numpy(emb)).numpy()
    weights = {k: v.detach().numpy() for k, v in block.state_dict().items()}
    error = relative_error(out, ref.res_block(x, emb, weights, groups=4))
    print()
    print(f"5. One U-Net residual block ({c_in} -> {c_out} channels on {S} x {S}, 3 x 3 convolutions, GroupNorm,")
    print(f"   the step's scale and shift): torch vs NumPy float64, relative error {error:.1e}  limit 1e-10 "
          f"{verdict(error, 1e-10)}")
    return error < 1e-10


def _generate(quick: bool) -> bool:
    """The chapter's run, as `tinymm train text-to-image --out chapters/ch11_text_to_image` wrote it
    (30 minutes on two cores: too long for a tour stop, so the stop reads what it measured)."""
    import json

    from tiny_mm.notebooks import REPO_ROOT

    print()
    path = REPO_ROOT / "chapters" / "ch11_text_to_image" / "results.json"
    if not path.is_file():
        print(f"6. no {path.relative_to(REPO_ROOT)}: `tinymm train text-to-image --out chapters/ch11_text_to_image`")
        return True
    run = json.loads(path.read_text())
    print("6. The chapter's run (`tinymm train text-to-image`, read from results.json): the share of samples")
    print("   in which the judge (a tiny CLIP) sees the prompt's colour and shape:")
    for r in run["rows"]:
        print(f"   {r['generator']:<10} {r['setting']:<14} seen {100 * r['seen']['match']:5.1f}%   "
              f"held out {100 * r['heldout']['match']:5.1f}%")
    return True
