"""Chapter 8's stop: Flamingo's media mask and closed gates, LLaVA's prefix, the Q-Former's masks, against NumPy."""
from __future__ import annotations

from tiny_mm.tour.common import relative_error, verdict


def _randomize(module, rng, scale: float = 0.3) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.as_tensor(scale * rng.standard_normal(tuple(p.shape))))


def _weights(module) -> dict:
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def run(quick: bool) -> bool:
    import numpy as np
    import torch

    from chapters.ch08_vlm_adapters import reference as ref
    from tiny_mm.adapters.flamingo import FlamingoLM, media_mask
    from tiny_mm.adapters.llava import LlavaProjector, PrefixLM
    from tiny_mm.language_model import LMConfig, TinyLM

    rng = np.random.default_rng()  # fresh inputs each tour
    ok = True
    config = LMConfig(width=16 if quick else 32, layers=2 if quick else 4, heads=2, context_length=24)
    B, L, T, N, d_img = 2, 12 if quick else 20, 3, 5, 10

    # 1. The media mask on random interleaved sequences.
    locations = np.zeros((B, L), dtype=bool)
    for b in range(B):
        locations[b, rng.choice(L, size=int(rng.integers(1, T + 1)), replace=False)] = True
    mask = media_mask(torch.from_numpy(locations), T, 2)[:, 0].numpy()
    same = bool(np.array_equal(mask, ref.media_mask_reference(locations, T, 2)))
    ok &= same
    print("Flamingo lets each text token read only the image whose <image> marker most recently precedes it.")
    print()
    print(f"1. Media mask, {B} random sequences of {L} tokens with up to {T} images: "
          f"equal to the NumPy reference {'ok' if same else 'FAIL'}")
    row = "".join("I" if x else "." for x in locations[0])
    print(f"   markers   {row}")
    print(f"   image of  {''.join(str(int(np.argmax(m)) // 2) if m.any() else '-' for m in mask[0])}")

    # 2. FlamingoLM: the frozen LM exactly at initialisation; the float64 reference once gates open.
    lm = TinyLM(config)
    _randomize(lm, rng)
    model = FlamingoLM(lm, d_img, num_latents=2, resampler_layers=1, every=2)
    ids = rng.integers(0, config.vocab_size, size=(B, L))
    features = rng.standard_normal((B, T, N, d_img))
    args = (torch.from_numpy(ids), torch.from_numpy(features).float(), torch.from_numpy(locations))
    with torch.no_grad():
        identical = torch.equal(model(*args), lm(args[0]))
        _randomize(model.resampler, rng)
        _randomize(model.gated, rng, scale=0.5)  # gates open at random values
        out = model(*args).numpy()
    media = np.stack([ref.perceiver_resampler(features[:, t], _weights(model.resampler), 1, 2) for t in range(T)], 1)
    gated = {int(i): (_weights(g), media.reshape(B, T * 2, d_img), ref.media_mask_reference(locations, T, 2), 2)
             for i, g in model.gated.items()}
    expected = ref.lm_logits(ids, _weights(lm), config.layers, config.heads, gated=gated)
    error, limit = relative_error(out, expected), 1e-5
    ok &= identical and error < limit
    print()
    print(f"2. FlamingoLM over a {config.layers}-block LM of width {config.width}, gated layers before blocks "
          f"{sorted(int(i) for i in model.gated)}")
    print(f"   gates closed (tanh(0) = 0): logits equal the frozen LM's bit for bit {'ok' if identical else 'FAIL'}")
    print(f"   gates open: float32 vs NumPy float64, relative error {error:.1e}  limit {limit:.0e} "
          f"{verdict(error, limit)}")

    # 3. LLaVA: projected patch features as a prefix.
    prefix_model = PrefixLM(lm, LlavaProjector(d_img, config.width, "mlp"))
    _randomize(prefix_model.adapter, rng)
    with torch.no_grad():
        out = prefix_model(torch.from_numpy(ids[:, :8]), torch.from_numpy(features[:, 0]).float()).numpy()
    prefix = ref.llava_prefix(features[:, 0], _weights(prefix_model.adapter), "mlp")
    full = ref.lm_logits(ids[:, :8], _weights(lm), config.layers, config.heads, prefix=prefix, prefix_position=1)
    expected = np.concatenate([full[:, :1], full[:, 1 + N:]], axis=1)  # <bos> and the words, not the image
    error = relative_error(out, expected)
    ok &= error < limit
    trainable = sum(p.numel() for p in prefix_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in prefix_model.parameters())
    print()
    print(f"3. LLaVA-1.5's MLP projection, {N} image vectors after <bos>: relative error {error:.1e}  limit {limit:.0e} "
          f"{verdict(error, limit)}")
    print(f"   trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.1f}%): the LM stays frozen")
    ok &= _qformer(rng, quick)
    print()
    print("What this showed: Flamingo's resampler and gated layers, LLaVA's projection and BLIP-2's Q-Former\n"
          "compute what the chapter's NumPy reference computes; closed gates leave the frozen model untouched;\n"
          "each token reads only its own image; each Q-Former objective sees only what its mask allows.\n"
          "`tinymm train adapters` runs the captioning experiment.")
    return ok


def _qformer(rng, quick: bool) -> bool:
    """BLIP-2's Q-Former: its three masks and its joint pass under each, against the NumPy reference."""
    import numpy as np
    import torch

    from chapters.ch08_vlm_adapters import reference_qformer as ref
    from tiny_mm.adapters.qformer import QFormer, objective_mask

    Q, T, B, N = 3, 5, 2, 6
    lengths = rng.integers(2, T + 1, size=B)
    masks_equal = all(
        np.array_equal(objective_mask(name, Q, T, torch.from_numpy(lengths)).numpy(),
                       ref.hide_padding(ref.MASKS[name](Q, T), Q, lengths))
        for name in ("itc", "itm", "itg")
    )
    model = QFormer(num_queries=Q, width=16, heads=2, depth=2 if quick else 3, image_width=10,
                    vocab_size=45, max_text_len=8).eval()
    _randomize(model, rng, scale=0.3)
    image = rng.standard_normal((B, N, 10))
    ids = rng.integers(4, 45, size=(B, T))
    ids[:, 0] = 1
    for b in range(B):
        ids[b, lengths[b]:] = 0
    errors = {}
    for objective in ("itc", "itm", "itg"):
        with torch.no_grad():
            queries, text = model.joint(torch.from_numpy(image).float(), torch.from_numpy(ids),
                                        torch.from_numpy(lengths), objective)
        ref_queries, ref_text = ref.qformer_forward(_weights(model), image, ids, lengths, objective, 2)
        errors[objective] = max(relative_error(queries.numpy(), ref_queries),
                                relative_error(text.numpy(), ref_text))
    limit = 1e-5
    ok = masks_equal and all(e < limit for e in errors.values())
    print()
    print(f"4. BLIP-2's Q-Former: {Q} queries + {T} text tokens. Masks over [queries ; text] for ITC (unimodal),")
    print(f"   ITM (bidirectional), ITG (queries alone, text causal), with padding: equal to the NumPy reference "
          f"{'ok' if masks_equal else 'FAIL'}")
    shown = "  ".join(f"{k}: {v:.1e}" for k, v in errors.items())
    print(f"   joint pass under each mask, float32 vs NumPy float64, relative error {shown}  limit {limit:.0e} "
          f"{verdict(max(errors.values()), limit)}")
    return ok
