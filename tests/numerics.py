"""The one comparison most tests make: relative error of a result against a reference."""
from __future__ import annotations

import numpy as np
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor | np.ndarray) -> float:
    """||out - ref|| / ||ref||, computed in float64; a shape mismatch or a NaN/inf in out fails.

    ref may be a NumPy array (the chapters' float64 references).
    """
    ref = torch.from_numpy(np.asarray(ref, dtype=np.float64)) if not isinstance(ref, torch.Tensor) else ref
    out, ref = out.detach().double(), ref.detach().double()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite values"
    return float((out - ref).norm() / ref.norm())


def randomize(module: torch.nn.Module, rng: np.random.Generator, scale: float = 0.3) -> None:
    """Fresh N(0, scale^2) values for every parameter (gates, gains and biases included), so no
    term of a comparison hides behind an initial zero or one."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.as_tensor(scale * rng.standard_normal(tuple(p.shape))))


def float64_weights(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The module's state_dict as float64 arrays: what the chapters' NumPy references take."""
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


def torch_encoder_layer(block) -> torch.nn.TransformerEncoderLayer:
    """PyTorch's own pre-LN encoder layer holding a `tiny_mm.layers.TransformerBlock`'s weights, in
    float64 and eval mode: the independent reference for the book's blocks."""
    d, h = block.width, block.heads
    ref = torch.nn.TransformerEncoderLayer(
        d, h, dim_feedforward=block.mlp.c_fc.out_features, dropout=0.0, activation="gelu",
        batch_first=True, norm_first=True,
    ).double()
    a = block.attn
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
        ref.self_attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
        ref.self_attn.out_proj.load_state_dict(a.out_proj.state_dict())
        ref.linear1.load_state_dict(block.mlp.c_fc.state_dict())
        ref.linear2.load_state_dict(block.mlp.c_proj.state_dict())
        ref.norm1.load_state_dict(block.ln_1.state_dict())
        ref.norm2.load_state_dict(block.ln_2.state_dict())
    return ref.eval()  # no dropout
