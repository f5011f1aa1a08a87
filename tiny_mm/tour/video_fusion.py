"""Chapter 10's stop: the four fusion strategies' parameter formulas, bottleneck fusion and the
training objective against the NumPy reference, and the textbook's 155M estimate recounted."""
from __future__ import annotations

from tiny_mm.tour.common import relative_error, verdict

MODALITIES = ("video", "audio", "text")

# The textbook's worked solution to its exercise 4 (source 000, part (d)): a 12-layer, d = 1024
# fusion transformer. Its figures, as printed; the stop recounts each from torch modules.
TEXT_FIGURES = {"encoders": 2_103_296, "tokens": 3_072, "per_layer": 12_587_008,
                "fusion": 151_044_096, "head": 1_460_224, "total": 154_610_688}


def _randomize(module, rng, scale: float = 0.3) -> None:
    import torch

    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.as_tensor(scale * rng.standard_normal(tuple(p.shape))))


def _weights(module, prefix: str = "") -> dict:
    return {k[len(prefix):]: v.detach().double().numpy()
            for k, v in module.state_dict().items() if k.startswith(prefix)}


def run(quick: bool) -> bool:
    import numpy as np

    rng = np.random.default_rng()  # a fresh configuration and fresh inputs each tour
    print("Video, audio and caption tokens fused four ways (early: one encoder over all; late: three")
    print("encoders, pooled; cross: late + cross-attention; bottleneck: a few shared tokens are the only")
    print("channel between modalities), trained on action cross-entropy plus three auxiliary losses.")
    print()
    ok = _parameters(rng, quick)
    ok &= _bottleneck(rng, quick)
    ok &= _objective(rng)
    ok &= _textbook_estimate()
    print()
    print("What this showed: exact parameter formulas for the four strategies; bottleneck fusion and the")
    print("whole training objective (value and gradients) compute what the chapter's NumPy reference")
    print("computes; the textbook's 155M estimate holds as a headline, but its sub-totals leave out biases.")
    print("`tinymm train video-fusion` runs the experiment.")
    return ok


def _parameters(rng, quick: bool) -> bool:
    from tiny_mm.counting_video import fusion_params
    from tiny_mm.video_fusion import STRATEGIES, VideoFusionConfig

    heads = int(rng.choice([1, 2, 4]))
    config = VideoFusionConfig(
        width=heads * int(rng.integers(2, 5 if quick else 17)), heads=heads, layers=int(rng.integers(1, 4)),
        mlp_ratio=float(rng.choice([1.0, 2.0, 4.0])), num_classes=int(rng.integers(2, 40)),
        n_bottleneck=int(rng.integers(1, 9)),
    )
    print("1. Parameter formulas (tiny_mm.counting_video) vs the instantiated models, random configuration:")
    print(f"   d = {config.width}, h = {config.heads}, L = {config.layers}, mlp_ratio = {config.mlp_ratio}, "
          f"C = {config.num_classes}, n_b = {config.n_bottleneck}")
    print(f"   {'strategy':<11} {'formula':>10} {'counted':>10}")
    ok = True
    for strategy in ("early", "late", "cross", "bottleneck"):
        formula = fusion_params(strategy, config)["total"]
        counted = sum(p.numel() for p in STRATEGIES[strategy](config).parameters())
        ok &= formula == counted
        print(f"   {strategy:<11} {formula:>10,} {counted:>10,}  {'ok' if formula == counted else 'FAIL'}")
    return ok


def _bottleneck(rng, quick: bool) -> bool:
    import numpy as np
    import torch

    from chapters.ch10_video_fusion import reference as ref
    from tiny_mm.video_fusion import BottleneckFusion, VideoFusionConfig

    d, heads, nb, layers = 8 if quick else 16, 2, int(rng.integers(1, 5)), 2
    model = BottleneckFusion(VideoFusionConfig(width=d, heads=heads, layers=layers, num_classes=4, n_bottleneck=nb))
    _randomize(model, rng)
    B, tokens = 3, {"video": int(rng.integers(2, 9)), "audio": int(rng.integers(2, 9)), "text": 6}
    streams = {m: rng.standard_normal((B, tokens[m], d)) for m in MODALITIES}
    lengths = rng.integers(1, 7, size=B)
    lengths[0] = 6
    with torch.no_grad():
        out, z_out = model.encode(*(torch.from_numpy(streams[m]).float() for m in MODALITIES),
                                  torch.from_numpy(lengths))
    start = np.broadcast_to(_weights(model)["bottleneck"], (B, nb, d))  # (B, n_b, d)
    block = lambda layer: {m: _weights(model.encoders[m][layer]) for m in MODALITIES}  # noqa: E731
    z, x = ref.bottleneck_fusion_layer(start, streams, block(0), heads, lengths)
    # The wiring: after one layer the video has heard nothing from the audio; the shared tokens have.
    other = dict(streams, audio=rng.standard_normal(streams["audio"].shape))
    z_other, x_other = ref.bottleneck_fusion_layer(start, other, block(0), heads, lengths)
    apart = np.array_equal(x_other["video"], x["video"]) and not np.allclose(z_other, z)
    for layer in range(1, layers):
        z, x = ref.bottleneck_fusion_layer(z, x, block(layer), heads, lengths)
    valid_text = [(b, slice(0, n)) for b, n in enumerate(lengths)]  # padding rows are not compared
    pieces = [(out["video"].numpy(), x["video"]), (out["audio"].numpy(), x["audio"]), (z_out.numpy(), z)]
    pieces += [(out["text"].numpy()[b, s], x["text"][b, s]) for b, s in valid_text]
    ours = np.concatenate([a.ravel() for a, _ in pieces])
    theirs = np.concatenate([b.ravel() for _, b in pieces])
    error, limit = relative_error(ours, theirs), 1e-5
    print()
    print(f"2. Bottleneck fusion, {layers} layers of width {d} with n_b = {nb} shared tokens; tokens "
          f"{tokens['video']} video, {tokens['audio']} audio, 6 text (lengths {lengths.tolist()}):")
    print("   BottleneckFusion (float32) vs the NumPy reference applied layer by layer (float64):")
    print(f"   relative error {error:.1e}  limit {limit:.0e} {verdict(error, limit)}")
    print(f"   after one layer the video tokens ignore a change of audio, the shared tokens do not: "
          f"{'ok' if apart else 'FAIL'}")
    return error < limit and apart


def _objective(rng) -> bool:
    import numpy as np
    import torch

    from chapters.ch10_video_fusion import reference as ref
    from tiny_mm.video_objectives import (
        ObjectiveWeights, action_loss, masked_modality_loss, pairwise_contrastive_loss, temporal_order_loss,
        total_objective,
    )

    B, C, d = 8, 32, 16
    ordered = rng.random(B) < 0.5
    ordered[:2] = (True, False)
    x = dict(logits=rng.standard_normal((B, C)), labels=rng.integers(0, C, size=B),
             streams={m: rng.standard_normal((B, d)) for m in MODALITIES}, logit_scale=float(rng.uniform(5, 20)),
             recon_pred=rng.standard_normal((B, d)), recon_target=rng.standard_normal((B, d)),
             order_logits=rng.standard_normal(B), ordered=ordered)
    leaf = lambda a: torch.tensor(a, dtype=torch.float32, requires_grad=True)  # noqa: E731
    logits, pred, order = leaf(x["logits"]), leaf(x["recon_pred"]), leaf(x["order_logits"])
    streams = {m: leaf(v) for m, v in x["streams"].items()}
    scale = torch.tensor(x["logit_scale"], requires_grad=True)  # learnable, as in training
    contrast, parts = pairwise_contrastive_loss(streams, scale)
    terms = {"action": action_loss(logits, torch.from_numpy(x["labels"])), "contrastive": contrast,
             "masked": masked_modality_loss(pred, torch.from_numpy(x["recon_target"]).float()),
             "temporal": temporal_order_loss(order, torch.from_numpy(ordered))}
    loss = total_objective(terms, ObjectiveWeights())
    loss.backward()
    expected = ref.total_objective(**x)
    grads = ref.total_objective_grad(**x)
    value_error = relative_error([loss.item()], [expected])
    ours = np.concatenate([logits.grad.numpy().ravel(), pred.grad.numpy().ravel(), order.grad.numpy().ravel(),
                           [scale.grad.item()]] + [streams[m].grad.numpy().ravel() for m in MODALITIES])
    theirs = np.concatenate([grads["logits"].ravel(), grads["recon_pred"].ravel(), grads["order_logits"].ravel(),
                             [grads["logit_scale"]]] + [grads["streams"][m].ravel() for m in MODALITIES])
    grad_error, limit = relative_error(ours, theirs), 1e-5
    print()
    print(f"3. L = L_action + 0.1 L_contrast + 0.05 L_mask + 0.05 L_temporal (the textbook's weights), "
          f"B = {B}, C = {C}, d = {d}:")
    print("   " + ", ".join(f"{k} {v.item():.3f}" for k, v in terms.items()) + f"  (contrastive = "
          + " + ".join(f"{k} {v.item():.3f}" for k, v in parts.items()) + ")")
    print(f"   total {loss.item():.5f} vs NumPy float64 {expected:.5f}: relative error {value_error:.1e}  "
          f"limit {limit:.0e} {verdict(value_error, limit)}")
    print("   autograd gradients (logits, streams, logit scale, reconstruction, order logits) vs the hand-")
    print(f"   derived ones: relative error {grad_error:.1e}  limit {limit:.0e} {verdict(grad_error, limit)}")
    return value_error < limit and grad_error < limit


def _textbook_estimate() -> bool:
    import torch
    from torch import nn

    from tiny_mm.counting_video import block_params
    from tiny_mm.video_fusion import VideoFusionConfig

    def numel(module) -> int:
        return sum(p.numel() for p in module.parameters())

    d = 1024
    with torch.device("meta"):  # shapes only: no memory, no weights
        layer = nn.TransformerEncoderLayer(d, 16, dim_feedforward=4 * d, batch_first=True)
        encoders = nn.ModuleList(nn.Sequential(nn.Linear(k, d), nn.LayerNorm(d)) for k in (768, 512, 768))
        head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 400))
        exact = {"encoders": numel(encoders), "tokens": 3 * d, "per_layer": numel(layer),
                 "fusion": 12 * numel(layer), "head": numel(head)}
    exact["total"] = exact["encoders"] + exact["tokens"] + exact["fusion"] + exact["head"]
    ours = block_params(VideoFusionConfig(width=d, heads=16, layers=12, mlp_ratio=4.0))
    left_out = {  # what each short sub-total leaves out (d = 1024)
        "encoders": "3d: the projections' biases",
        "tokens": "",
        "per_layer": "9d: biases and LayerNorms",
        "fusion": "12 x 9d",
        "head": "d + 400: the Linears' biases",
        "total": "",
    }
    labels = {"encoders": "input projections (3 x Linear + LayerNorm)", "tokens": "modality tokens (3 x d)",
              "per_layer": "one fusion layer", "fusion": "12 fusion layers", "head": "head (LN, Linear, GELU, Linear)",
              "total": "total"}
    print()
    print("4. The textbook's worked estimate (exercise 4: 12 fusion layers, d = 1024, 16 heads, MLP 4d, 400")
    print("   classes), recounted from torch modules on the meta device:")
    print(f"   {'':<44} {'text':>12} {'exact':>12} {'short by':>8}")
    for key, label in labels.items():
        short = exact[key] - TEXT_FIGURES[key]
        print(f"   {label:<44} {TEXT_FIGURES[key]:>12,} {exact[key]:>12,} {short:>8,}  {left_out[key]}")
    sums_up = TEXT_FIGURES["total"] == sum(TEXT_FIGURES[k] for k in ("encoders", "tokens", "fusion", "head"))
    same_block = ours == exact["per_layer"]
    headline = round(exact["total"] / 1e6) == 155
    print(f"   tiny_mm.counting_video.block_params(d = 1024) = {ours:,} = one nn.TransformerEncoderLayer "
          f"{'ok' if same_block else 'FAIL'}")
    print(f"   the text's own sum adds up {'ok' if sums_up else 'FAIL'}; its per-layer figure is 12d^2 + 4d, the layer")
    print("   has 12d^2 + 13d (biases of q, k, v, out: 4d; of the MLP: 4d + d; two LayerNorms: 4d);")
    print(f"   the headline 'about 155M' holds: {exact['total'] / 1e6:.1f}M "
          f"({100 * (exact['total'] / TEXT_FIGURES['total'] - 1):.2f}% above the text's sum) "
          f"{'ok' if headline else 'FAIL'}")
    return sums_up and same_block and headline
