"""Chapter 3's stop: a patch embedding is a strided convolution, and our ViT is open_clip's."""
from __future__ import annotations

from tiny_mm.tour.common import relative_error, verdict


def _randomize(module, rng) -> None:
    """Fresh random values for every parameter, LayerNorm gains and biases included."""
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(0.2 * rng.standard_normal(tuple(p.shape))))


def run(quick: bool) -> bool:
    import numpy as np
    import torch
    from torch import nn

    from chapters.ch03_vit import reference as ref
    from tiny_mm.vit import VisionConfig, VisionTransformer

    rng = np.random.default_rng()  # fresh inputs each tour
    ok = True

    # 1. Patch embedding, three ways. Odd sizes, so no two axes can be confused.
    B, C, S, P, width = 2, 3, 24 if quick else 48, 8, 20
    images = rng.standard_normal((B, C, S, S))  # (B, C, S, S)
    weight = rng.standard_normal((width, C, P, P))  # (width, C, P, P)
    unfold = ref.patch_embed(images, weight, P)  # (B, N, width), float64
    conv_loop = ref.conv_patch_embed(images, weight, P)  # (B, N, width), float64
    conv = nn.Conv2d(C, width, P, stride=P, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(weight))
        grid = conv(torch.from_numpy(images).float())  # (B, width, S/P, S/P), float32
    torch_tokens = grid.flatten(2).transpose(1, 2).numpy()  # (B, N, width)
    errors = {"NumPy strided conv (loop)": (relative_error(conv_loop, unfold), 1e-12),
              "torch Conv2d, float32": (relative_error(torch_tokens, unfold), 1e-5)}
    print("A ViT cuts the image into P x P patches and multiplies each flattened patch by one matrix;")
    print("a convolution with kernel P and stride P computes exactly that, and is how CLIP writes it.")
    print()
    print(f"1. Patch embedding of {B} images {C} x {S} x {S}, P = {P}, width {width}: {(S // P) ** 2} tokens each")
    print("   reference: patchify + one matmul (NumPy float64)")
    for label, (error, limit) in errors.items():
        ok &= error < limit
        print(f"   {label:<28} relative error {error:.1e}  limit {limit:.0e} {verdict(error, limit)}")

    # 2. The whole tower against open_clip's, loaded with the same random weights.
    import open_clip  # noqa: F401  (registers the models; its VisionTransformer is what we compare with)
    from open_clip.transformer import QuickGELU as OpenClipQuickGELU
    from open_clip.transformer import VisionTransformer as OpenClipViT

    if quick:
        config = VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=2, output_dim=32)
        name = "a small ViT"
    else:
        config = VisionConfig()  # ViT-B/32
        name = "ViT-B/32"
    theirs = OpenClipViT(
        image_size=config.image_size, patch_size=config.patch_size, width=config.width,
        layers=config.layers, heads=config.heads, mlp_ratio=config.mlp_ratio,
        output_dim=config.output_dim, act_layer=OpenClipQuickGELU,
    ).eval()
    _randomize(theirs, rng)
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same names, same shapes, every key
    x = torch.from_numpy(rng.standard_normal((2, 3, config.image_size, config.image_size))).float()
    with torch.no_grad():
        ref_out = theirs.double()(x.double())  # (2, E) float64: open_clip's tower in double
        out = ours(x)  # (2, E) float32
    error, limit = relative_error(out.numpy(), ref_out.numpy()), 1e-5
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    ok &= error < limit and n_ours == n_theirs
    print()
    print(f"2. {name} ({config.layers} layers, width {config.width}, {config.num_tokens} tokens) against "
          "open_clip's tower with the same random weights")
    print(f"   embeddings: tiny_mm float32 vs open_clip float64, relative error {error:.1e}  "
          f"limit {limit:.0e} {verdict(error, limit)}")
    print(f"   parameters: tiny_mm {n_ours:,}, open_clip {n_theirs:,} "
          f"{'ok' if n_ours == n_theirs else 'FAIL'}")
    print()
    print(
        "What this showed: unfold + matmul and a strided convolution are one computation, and the\n"
        "chapter's vision transformer (class token, positions, ln_pre, pre-norm blocks, ln_post,\n"
        "projection) is open_clip's, weight for weight: CLIP's released image towers load into it."
    )
    return ok
