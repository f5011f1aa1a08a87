"""Chapter 6's stop: a captioner's decoder checked against NumPy, its cache against no cache, and a run."""
from __future__ import annotations

from tiny_mm.tour.common import relative_error, verdict

# What the stop asks of training. The full run is the default recipe (600 steps), whose target
# is the 95% exact match on images never seen in training; the quick run (80 steps) is
# far too short for that, so it only has to have lowered the loss.
FULL_EXACT = 0.95
QUICK_LOSS_RATIO = 0.5


def _layer_and_loss(rng) -> bool:
    import numpy as np
    import torch

    from chapters.ch06_captioning import reference as ref
    from tiny_mm.captioning import DecoderLayer, caption_loss

    ok = True
    print("1. One decoder layer (causal self-attention, cross-attention to 16 image tokens, MLP)")
    layer = DecoderLayer(64, 4)
    with torch.no_grad():  # fresh values everywhere, LayerNorm gains and biases included
        for p in layer.parameters():
            p.copy_(torch.as_tensor((0.125 if p.dim() > 1 else 0.5) * rng.standard_normal(tuple(p.shape))))
    x, image = rng.standard_normal((2, 10, 64)), rng.standard_normal((2, 16, 64))
    with torch.no_grad():
        out, probs = layer(torch.from_numpy(x).float(), torch.from_numpy(image).float())
    params = {k: v.double().numpy() for k, v in layer.state_dict().items()}
    ref_out, ref_probs = ref.decoder_layer(x, image, params, 4)
    limit = 1e-5
    for name, ours, theirs in (("output", out, ref_out), ("cross-attention", probs, ref_probs)):
        error = relative_error(ours.numpy(), theirs)
        ok &= error < limit
        print(f"   {name:<16} tiny_mm float32 vs NumPy float64, same weights: relative error {error:.1e}  "
              f"limit {limit:.0e} {verdict(error, limit)}")

    print("2. Teacher forcing: the loss over non-padding targets, and its gradient")
    logits = rng.standard_normal((4, 10, 45))
    targets = rng.integers(3, 45, size=(4, 10))
    targets[np.arange(10)[None, :] >= rng.integers(4, 11, size=4)[:, None]] = 0  # pad after each caption
    t = torch.from_numpy(logits).float().requires_grad_()
    loss = caption_loss(t, torch.from_numpy(targets))
    loss.backward()
    error = relative_error(t.grad.numpy(), ref.masked_cross_entropy_grad(logits, targets))
    value = abs(float(loss.detach()) - ref.masked_cross_entropy(logits, targets))
    ok &= error < limit and value < 1e-5
    print(f"   loss: |tiny_mm - NumPy| = {value:.1e};  gradient vs the hand-derived one: relative error "
          f"{error:.1e}  {verdict(error, limit)};  padded positions get gradient "
          f"{float(t.grad[torch.from_numpy(targets) == 0].abs().max()):.0f}")
    return ok


def _cache(rng) -> bool:
    import torch

    from tiny_mm.captioning import Captioner, CaptionerConfig, generate

    print("3. Generation with the key/value cache against re-reading the whole prefix at every step")
    torch.manual_seed(int(rng.integers(2**31)))
    model = Captioner(CaptionerConfig()).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    images = torch.from_numpy(rng.standard_normal((4, 3, 32, 32)))
    ok = True
    for temperature in (0.0, 1.0):
        seed = int(rng.integers(2**31))
        fast, slow = (generate(model, images, temperature=temperature, use_cache=c,
                               generator=torch.Generator().manual_seed(seed)) for c in (True, False))
        same = bool(torch.equal(fast.tokens, slow.tokens))
        error = relative_error(fast.logits.numpy(), slow.logits.numpy())
        ok &= same and error < 1e-12
        print(f"   {'greedy' if temperature == 0 else 'sampled at T = 1':<17} {fast.tokens.shape[1] - 1} words x 4 "
              f"images: same words {'ok' if same else 'FAIL'}, logits relative error {error:.1e}")
    return ok


def _train(quick: bool) -> bool:
    from tiny_mm.train_captioner import ATTRIBUTES, TrainConfig, train_captioner

    config = TrainConfig(steps=80, train_images=1024, eval_images=100) if quick else TrainConfig(eval_images=300)
    print(f"4. Training on shapes images with canonical captions: {config.steps} steps of {config.batch_size}"
          f"{' (a quick run: far short of the full recipe)' if quick else ''}")
    result = train_captioner(config, progress=False)
    s = result.scores
    print(f"   {result.seconds:.0f} s; loss {result.losses[0]:.2f} -> {result.losses[-1]:.3f}")
    print(f"   greedy captions of {config.eval_images} images never seen: exact match {100 * s['exact']:.1f}%; "
          + ", ".join(f"{a} {100 * s[a]:.0f}%" for a in ATTRIBUTES))
    if quick:
        ok = result.losses[-1] < QUICK_LOSS_RATIO * result.losses[0]
        print(f"   loss below {QUICK_LOSS_RATIO} of where it started: {'ok' if ok else 'FAIL'}")
    else:
        ok = s["exact"] >= FULL_EXACT
        print(f"   exact match at least {FULL_EXACT:.0%}: {'ok' if ok else 'FAIL'}")
    return ok


def run(quick: bool) -> bool:
    import numpy as np

    rng = np.random.default_rng()
    print("A captioner: a patch encoder, and a decoder whose layers read the image by cross-attention.")
    print("Its decoder must equal the NumPy reference, its cache must change nothing, and it must learn.")
    print()
    ok = _layer_and_loss(rng)
    ok &= _cache(rng)
    ok &= _train(quick)
    print()
    print(
        "What this showed: the decoder layer is the formula the chapter writes down; the cache only\n"
        "saves work; and a small captioner trained for a minute on a CPU describes new images."
    )
    return ok
