"""CLIP's symmetric contrastive loss: the PyTorch rung of chapter 4.

Notation (the same as ``chapters/ch04_contrastive/reference.py``):

    I : (N, d)  image embeddings, row i is image i, L2-normalised
    T : (N, d)  text embeddings, row i describes image i, L2-normalised
    s : scalar  the logit scale, s = 1 / temperature
    S = s * I @ T.T   (N, N) logits; S[i, j] scores image i against text j

    loss = (cross_entropy(rows of S) + cross_entropy(columns of S)) / 2

Three pieces live here:

- `clip_loss`: the loss itself, written with a matmul and ``F.cross_entropy``
  so it reads like the formula. Autograd gives the gradients.
- `ClipLoss`: the module a training loop uses. It owns the learnable
  log-temperature (capped at a scale of 100, as CLIP does), can normalise its
  inputs, can run the fused Triton kernel instead, and, when
  ``torch.distributed`` is initialised, contrasts each rank's rows against the
  whole global batch.
- `gather_with_grad`: the all-gather that lets gradients flow back to the
  rank that owns each row.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["clip_loss", "ClipLoss", "gather_with_grad", "local_clip_loss"]


# --------------------------------------------------------------------------- checks


def _check_features(image: Tensor, text: Tensor) -> None:
    """ValueError unless image and text are matching (N, d) floating tensors with N, d >= 1."""
    for name, x in (("image", image), ("text", text)):
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (N, d), got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, d), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if image.shape != text.shape:
        raise ValueError(
            f"image and text must have the same shape (N, d), got {tuple(image.shape)} "
            f"and {tuple(text.shape)}"
        )
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(
            f"image and text need at least one row and one column, got shape {tuple(image.shape)}"
        )
    if image.dtype != text.dtype:
        raise ValueError(f"image and text must share a dtype, got {image.dtype} and {text.dtype}")
    if image.device != text.device:
        raise ValueError(f"image and text must be on one device, got {image.device} and {text.device}")


def _check_logit_scale(logit_scale: float | Tensor) -> None:
    """ValueError unless logit_scale is a finite positive number or 0-dim tensor."""
    if isinstance(logit_scale, Tensor):
        if logit_scale.dim() != 0:
            raise ValueError(
                f"logit_scale must be a number or a 0-dim tensor, got shape {tuple(logit_scale.shape)}"
            )
        value = float(logit_scale.detach())  # one scalar read: cheap next to the (N, N) matmul
    elif isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        value = float(logit_scale)
    else:
        raise ValueError(
            f"logit_scale must be a number or a 0-dim tensor, got {type(logit_scale).__name__}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"logit_scale must be finite and positive, got {value}")


# --------------------------------------------------------------------------- the loss


# ANCHOR: clip_loss
def clip_loss(image: Tensor, text: Tensor, logit_scale: float | Tensor) -> Tensor:
    """Mean symmetric cross-entropy of N matched image/text pairs.

    Args:
        image: (N, d) image embeddings, rows L2-normalised; row i matches text row i.
        text: (N, d) text embeddings, rows L2-normalised.
        logit_scale: s = 1 / temperature, a positive float or a 0-dim tensor
            (a tensor that requires grad gets a gradient).

    Returns:
        0-dim tensor: (mean over images of -log p(text_i | image_i)
                       + mean over texts of -log p(image_i | text_i)) / 2.
    """
    _check_features(image, text)
    _check_logit_scale(logit_scale)
    logits_per_image = logit_scale * (image @ text.T)  # (N, N): row i scores image i against every text
    logits_per_text = logits_per_image.T  # (N, N): row j scores text j against every image
    labels = torch.arange(image.shape[0], device=image.device)  # (N,): the match of row i is column i
    image_to_text = F.cross_entropy(logits_per_image, labels)  # softmax over each row
    text_to_image = F.cross_entropy(logits_per_text, labels)  # softmax over each column of S
    return (image_to_text + text_to_image) / 2
# ANCHOR_END: clip_loss


# --------------------------------------------------------------------------- across processes


# ANCHOR: gather
class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends each row's gradient home.

    Forward: every rank contributes its (n_r, d) rows; every rank gets all
    (N, d) rows, N = sum of n_r, in rank order.

    Backward: my rows enter the loss of *every* rank (as columns of its
    logits), so rank q's backward produces dL_q/d(my rows) as my slice of its
    incoming (N, d) gradient. What training minimises is the sum (up to DDP's
    1/W) of all ranks' losses, whose gradient with respect to my rows is
    sum_q dL_q/d(my rows): hence an all_reduce-SUM of the incoming gradient,
    then my slice. (The plain ``dist.all_gather`` has no backward: it would
    silently drop the gradient through every row that came from elsewhere.)

    DDP then *averages* parameter gradients over the W ranks, so the update
    follows (1/W) * sum_q dL_q/d theta = d(mean_q L_q)/d theta. The per-rank
    losses are weighted so that mean_q L_q is the full-batch loss (see
    `local_clip_loss`), so this is exactly the single-process full-batch
    gradient. Before DDP's division, the gradient reaching my rows is W times
    the full-batch one.
    """

    @staticmethod
    def forward(ctx, local: Tensor, sizes: tuple[int, ...], rank: int, group) -> Tensor:
        # all_gather needs equal shapes: pad every rank's rows to the largest count.
        padded = F.pad(local, (0, 0, 0, max(sizes) - local.shape[0])).contiguous()  # (max_n, d)
        chunks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(chunks, padded, group=group)
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)])  # (N, d)

    @staticmethod
    def backward(ctx, grad_all: Tensor):
        grad_all = grad_all.contiguous().clone()  # all_reduce works in place: keep autograd's buffer
        dist.all_reduce(grad_all, op=dist.ReduceOp.SUM, group=ctx.group)  # (N, d): summed over ranks
        start = sum(ctx.sizes[: ctx.rank])
        return grad_all[start : start + ctx.sizes[ctx.rank]], None, None, None  # (n_r, d): my rows


def gather_with_grad(local: Tensor, group=None) -> tuple[Tensor, int]:
    """Gather every rank's rows, keeping the autograd path back to each owner.

    Ranks may hold different numbers of rows (their counts are gathered
    first), but the feature size d must agree.

    Args:
        local: (n_r, d) this rank's rows.
        group: process group (default: the whole world).

    Returns:
        (all_rows, offset): all_rows is (N, d), ranks' rows in rank order;
        this rank's rows are all_rows[offset : offset + n_r].
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shape = torch.tensor(local.shape, dtype=torch.int64, device=local.device)  # (2,): (n_r, d)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    sizes = tuple(int(s[0]) for s in shapes)
    dims = sorted({int(s[1]) for s in shapes})
    if len(dims) != 1:
        raise ValueError(f"every rank must have the same feature size d, got {dims}")
    all_rows = _AllGatherWithGrad.apply(local, sizes, rank, group)
    return all_rows, sum(sizes[:rank])
# ANCHOR_END: gather


# ANCHOR: local_clip_loss
def local_clip_loss(
    local_image: Tensor,
    local_text: Tensor,
    all_image: Tensor,
    all_text: Tensor,
    logit_scale: float | Tensor,
    offset: int,
    world_size: int,
) -> Tensor:
    """This rank's share of the global-batch loss: its own rows against all N columns.

    Args:
        local_image, local_text: (n_r, d) this rank's rows (L2-normalised).
        all_image, all_text: (N, d) every rank's rows, from `gather_with_grad`.
        logit_scale: s > 0.
        offset: where this rank's rows start in the global batch.
        world_size: W, the number of ranks.

    Returns:
        0-dim tensor L_r, weighted so that the mean of L_r over the W ranks is
        the full-batch `clip_loss` of all N pairs. With equal batches the
        weight is 1 and L_r is simply the mean loss of this rank's rows.
    """
    n_local, n_total = local_image.shape[0], all_image.shape[0]
    logits_per_image = logit_scale * (local_image @ all_text.T)  # (n_r, N): my rows of S
    logits_per_text = logit_scale * (local_text @ all_image.T)  # (n_r, N): my columns of S, transposed
    # (n_r,): my row i is pair offset + i of the global batch
    labels = offset + torch.arange(n_local, device=local_image.device)
    loss = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
    # The full loss averages over N rows; this mean is over n_r. Weight n_r * W / N makes
    # mean_r(L_r) = (1/N) * sum over all rows, also when ranks hold different counts.
    return loss * (n_local * world_size / n_total)
# ANCHOR_END: local_clip_loss


# --------------------------------------------------------------------------- the module


class ClipLoss(nn.Module):
    """CLIP's contrastive loss with its (learnable) temperature.

    The parameter is the log of the scale, ``log_logit_scale`` (CLIP's
    checkpoints call it ``logit_scale``): learning the log keeps the scale
    positive and makes steps relative. It starts at log(1/0.07) and the scale
    used is capped at ``max_logit_scale`` (100), as in CLIP.

    Args:
        init_logit_scale: starting scale s = 1 / temperature (default 1/0.07).
        learnable: False keeps s fixed (stored as a buffer, never trained).
        max_logit_scale: cap on s (default 100); None for no cap.
        normalize: L2-normalise image and text rows inside (for raw encoder outputs).
        backend: "torch" (`clip_loss`) or "triton" (``kernels.clip_loss``, the fused
            kernel that never stores the (N, N) logits).
        gather_across_ranks: when torch.distributed is initialised with more than
            one rank, contrast against the global batch (see `forward`).

    Shapes: forward(image (n, d), text (n, d)) -> 0-dim tensor.
    """

    def __init__(
        self,
        init_logit_scale: float = 1 / 0.07,
        *,
        learnable: bool = True,
        max_logit_scale: float | None = 100.0,
        normalize: bool = False,
        backend: str = "torch",
        gather_across_ranks: bool = True,
    ) -> None:
        super().__init__()
        _check_logit_scale(init_logit_scale)
        if max_logit_scale is not None:
            _check_logit_scale(max_logit_scale)
            if init_logit_scale > max_logit_scale:
                raise ValueError(
                    f"init_logit_scale {init_logit_scale} is above max_logit_scale {max_logit_scale}"
                )
        if backend not in ("torch", "triton"):
            raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
        if backend == "triton":
            # Import the kernels now, not at the first forward: on a CPU they need
            # Triton's interpreter, which must be switched on before anything else
            # imports Triton (creating the optimiser does, through torch._dynamo).
            import kernels  # noqa: F401
        log_scale = torch.tensor(math.log(init_logit_scale))
        if learnable:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        self.learnable = learnable
        self.max_log_logit_scale = None if max_logit_scale is None else math.log(max_logit_scale)
        self.normalize = normalize
        self.backend = backend
        self.gather_across_ranks = gather_across_ranks

    @property
    def logit_scale(self) -> Tensor:
        """The scale the next forward uses: exp(log_logit_scale), capped. 0-dim tensor, no grad."""
        with torch.no_grad():
            log_scale = self.log_logit_scale
            if self.max_log_logit_scale is not None:
                log_scale = log_scale.clamp(max=self.max_log_logit_scale)
            return log_scale.exp()

    def _scale_for_forward(self) -> Tensor:
        """exp(log_logit_scale) after capping the parameter itself.

        CLIP clamps the parameter in place after each optimiser step. Clamping
        the data in place (under no_grad) just before it is used does the same
        thing one step later, and keeps the gradient flowing: the scale is
        exp(parameter), whose gradient never vanishes. Clamping inside the graph
        instead (exp(clamp(p, max))) would give zero gradient whenever p is
        above the cap, so the optimiser could never pull it back down.
        """
        if self.max_log_logit_scale is not None:
            with torch.no_grad():
                self.log_logit_scale.clamp_(max=self.max_log_logit_scale)
        return self.log_logit_scale.exp()  # 0-dim

    def _distributed(self) -> bool:
        return (
            self.gather_across_ranks
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )

    def _full_batch_loss(self, image: Tensor, text: Tensor, logit_scale: Tensor) -> Tensor:
        if self.backend == "triton":
            import kernels  # already imported by __init__; this only binds the name

            return kernels.clip_loss(image, text, logit_scale)
        return clip_loss(image, text, logit_scale)

    # ANCHOR: ClipLoss_forward
    def forward(self, image: Tensor, text: Tensor) -> Tensor:
        """Loss of this process's n pairs.

        Args:
            image, text: (n, d); row i of each is a matching pair (L2-normalised
                unless ``normalize=True``).

        Returns:
            0-dim tensor. One process: `clip_loss` of the n pairs. Several ranks
            (torch.distributed initialised): this rank's rows against the
            global batch of all ranks, weighted so that the mean over ranks
            is the full-batch loss; under DDP the averaged gradients are the
            full-batch gradients. Every rank must call forward and backward
            (both run collectives); a ValueError raised on one rank only leaves
            the others waiting in the gather until the process group's timeout.
        """
        _check_features(image, text)
        if self.normalize:
            image = F.normalize(image, dim=-1)  # (n, d)
            text = F.normalize(text, dim=-1)  # (n, d)
        logit_scale = self._scale_for_forward()
        if not self._distributed():
            return self._full_batch_loss(image, text, logit_scale)

        all_image, offset = gather_with_grad(image)  # (N, d)
        all_text, _ = gather_with_grad(text)  # (N, d)
        if self.backend == "triton":
            # The kernel computes the square (N, N) loss only: every rank computes the
            # full-batch loss (W times the work, still O(N*d) memory). Its mean over
            # ranks is the same full loss, so gradients match the torch path.
            return self._full_batch_loss(all_image, all_text, logit_scale)
        return local_clip_loss(
            image, text, all_image, all_text, logit_scale, offset, dist.get_world_size()
        )
    # ANCHOR_END: ClipLoss_forward

    def extra_repr(self) -> str:
        return (
            f"logit_scale={float(self.logit_scale):.4g}, learnable={self.learnable}, "
            f"normalize={self.normalize}, backend={self.backend!r}"
        )
