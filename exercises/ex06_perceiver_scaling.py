# Generated from solutions/ex06_perceiver_scaling.py by `python -m tiny_mm.stubs`: fill in every NotImplementedError.
"""Exercise 6 (chapter 7): what a Perceiver IO pass costs, and what doubling its inputs and outputs does.

A transformer encoder over M inputs pays for M x M attention scores in every
layer, so doubling M costs up to four times as much. Perceiver IO puts a
fixed array of N latents in the middle: the latents read the M inputs once
(cross-attention, ~ N M), think among themselves (L self-attention blocks,
~ N^2 each, whatever M is), and O output queries read the latents
(cross-attention, ~ O N). Write its cost down exactly, then answer:

  If you double the length of the inputs AND the number of outputs, how
  much more computation does Perceiver IO need? Exactly 2x? More? Less?
  When does the answer approach 2, and when 1?

What to do:
  1. Fill in `perceiver_io_flops`: the matmul FLOPs of one forward pass of
     ``tiny_mm.perceiver.PerceiverIO`` on one example. Count 2 m n k for every
     (m, k) @ (k, n) product, as ``torch.utils.flop_counter.FlopCounterMode``
     does: every Linear layer, and the two products of each attention
     (scores Q K^T and the weighted sum P V). Nothing else counts (biases,
     LayerNorm, GELU, softmax, residual adds are free here).
  2. Fill in `doubling_factor`, the answer to the question above.
  3. Grade your work:

         tinymm grade ex06

     The checks build real PerceiverIO modules of random sizes, run them
     under FlopCounterMode, and compare with your formula; a model of the
     Perceiver's ImageNet size is built on the meta device (no memory used).

The reference solution lives in solutions/ex06_perceiver_scaling.py
(`tinymm grade ex06 --solutions` grades it). The stub in exercises/ is
generated from it with `python -m tiny_mm.stubs`.
"""
from __future__ import annotations


def _check_positive(**sizes: int) -> None:
    """Raise ValueError unless every size is a positive int (bool is not an int here)."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def perceiver_io_flops(
    input_len: int,
    output_len: int,
    num_latents: int,
    width: int,
    depth: int,
    input_dim: int,
    query_dim: int,
    output_dim: int,
) -> int:
    """Matmul FLOPs of one forward pass of PerceiverIO on one example (batch 1).

    The model is ``PerceiverIO(PerceiverConfig(input_dim=C, num_latents=N,
    width=D, depth=L), query_dim=E, output_dim=P)`` (one read of the input,
    MLPs of hidden size 4x their width), fed inputs (1, M, C) and queries
    (1, O, E). In order:

    - encode: a cross-attention block. Queries: the N latents (width D);
      keys and values: the M inputs, projected from C to D features. Then
      its output projection (D -> D) and an MLP D -> 4D -> D on the N latents.
    - process: L self-attention blocks on the N latents: q, k, v and out
      projections (D -> D each), attention among N latents, MLP D -> 4D -> D.
    - decode: a cross-attention block. Queries: the O output queries (width
      E); keys and values: the N latents, projected from D to E. Output
      projection E -> E, MLP E -> 4E -> E on the O queries.
    - head: Linear(E, P) on each of the O outputs.

    An attention with Lq queries and Lk keys of width w costs 2 Lq Lk w for
    the scores and 2 Lq Lk w for the weighted sum, however many heads share
    the width. Return an int. Raise ValueError if any argument is not a
    positive int.
    """
    raise NotImplementedError(
        "ex06 (perceiver_io_flops): add up encode, process, decode and head; a (rows, a) -> "
        "(rows, b) Linear costs 2 * rows * a * b"
    )


def doubling_factor(
    input_len: int,
    output_len: int,
    num_latents: int,
    width: int,
    depth: int,
    input_dim: int,
    query_dim: int,
    output_dim: int,
) -> float:
    """How many times more FLOPs PerceiverIO needs when input_len and output_len both double.

    The same model (all other sizes unchanged) on 2M inputs and 2O output
    queries, against M inputs and O queries: a float, e.g. 1.5 for "half as
    much again". Raise ValueError if any argument is not a positive int.
    """
    raise NotImplementedError(
        "ex06 (doubling_factor): your perceiver_io_flops at (2M, 2O) over the same at (M, O)"
    )
