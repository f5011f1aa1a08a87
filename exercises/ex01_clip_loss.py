# Generated from solutions/ex01_clip_loss.py by `python -m tiny_mm.stubs`: fill in every NotImplementedError.
"""Exercise 1 (chapter 4): CLIP's contrastive loss and retrieval accuracy.

A batch holds N images and their N captions. Each encoder turns its inputs
into one embedding per row, so the batch gives two matrices of shape (N, d),
and row i of one belongs with row i of the other. CLIP trains both encoders so
that every image is closer to its own caption than to the N - 1 others, and
the other way round. You write the loss that says how far the batch is from
that, and the accuracy that says how often it already holds.

What to do:
  1. Fill in the two functions below: replace each
     `raise NotImplementedError(...)` with your code. The docstrings are the
     specification (shapes, what to return, which errors to raise). Use
     PyTorch operations only, so that gradients flow back to the inputs.
  2. Grade your work:

         tinymm grade ex01

     Each check is worth points; the scorecard prints, for every failing
     check, one line saying what went wrong. Re-run it as often as you like.
     The checks compare your numbers with the chapter's NumPy reference
     (chapters/ch04_contrastive/reference.py) on fresh random inputs, so
     read the chapter first; peeking at the reference is allowed, copying it
     teaches you less.

The reference solution lives in solutions/ex01_clip_loss.py
(`tinymm grade ex01 --solutions` grades it). The stub in exercises/ is
generated from it with `python -m tiny_mm.stubs`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def clip_contrastive_loss(
    image_embeddings: torch.Tensor,
    text_embeddings: torch.Tensor,
    temperature: float = 0.07,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric contrastive (InfoNCE) loss of a batch of N matched pairs.

    Args:
        image_embeddings: (N, d) tensor, one image embedding per row. Rows need
            not have unit length: normalise them yourself.
        text_embeddings: (N, d) tensor; row i is the caption of image i.
        temperature: positive float tau; the logits are cosine similarities
            divided by tau (CLIP starts at 0.07, i.e. a logit scale of ~14.3).

    Returns:
        loss: 0-dim tensor, the mean of the two cross-entropies below.
        logits: (N, N) tensor, logits[i, j] = cos(image_i, text_j) / tau.

    Steps:
        1. Divide every row of both inputs by its L2 norm, so that a dot
           product of two rows is their cosine similarity. Do not change the
           caller's tensors in place.
        2. logits = normalised_images @ normalised_texts.T / temperature, (N, N).
        3. Row i of `logits` scores image i against every caption; the right
           answer is caption i. Take the cross-entropy of each row against
           the target i, and average over rows (image -> text).
        4. Column j scores caption j against every image; the right answer
           is image j. Same cross-entropy over columns (text -> image).
        5. loss = (image -> text + text -> image) / 2.

    Raises:
        ValueError: if an input is not 2-D, or if the two inputs do not have
            the same shape (N, d). Say which shapes you got in the message.
    """
    raise NotImplementedError(
        "ex01 (clip_contrastive_loss): check the shapes (ValueError), normalise the rows, logits "
        "= I @ T.T / temperature, then average the cross-entropy of the rows and of the columns "
        "against targets 0..N-1."
    )


def retrieval_accuracy(logits: torch.Tensor) -> tuple[float, float]:
    """How often the matched pair wins: top-1 retrieval accuracy in both directions.

    Args:
        logits: (N, N) tensor of scores, logits[i, j] = score(image_i, text_j),
            for instance the logits that clip_contrastive_loss returns. The
            correct caption of image i is text i (the diagonal).

    Returns:
        (image_to_text, text_to_image), two Python floats in [0, 1]:
        image_to_text is the fraction of rows i whose largest entry is in
        column i (image i retrieves its own caption); text_to_image is the
        fraction of columns j whose largest entry is in row j.
        Use argmax; with ties, argmax's choice (the first maximum) counts.

    Raises:
        ValueError: if logits is not a square 2-D tensor.
    """
    raise NotImplementedError(
        "ex01 (retrieval_accuracy): check the shape (ValueError); compare logits.argmax(dim=1) "
        "(best caption of each image) and logits.argmax(dim=0) (best image of each caption) with "
        "arange(N)."
    )
