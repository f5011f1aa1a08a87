"""ClipLoss across 2 processes (gloo, CPU) equals the single-process full-batch loss.

One `torch.multiprocessing.spawn` runs every case (starting processes costs
seconds, checks cost milliseconds); the workers save what they computed and
the tests compare it here, in the parent, with the float64 NumPy reference of
the *whole* batch. Nothing is shared between the parent's reference and the
workers except the random inputs.

What must hold with W ranks, each holding a slice of the batch:
  (a) the mean over ranks of the per-rank losses is the full-batch loss;
  (b) each rank's gradient with respect to its own rows, divided by W, is the
      matching slice of the full-batch gradient (gather_with_grad's backward
      sums over ranks; DDP's average divides by W);
  (c) a model wrapped in DistributedDataParallel gets the full-batch gradient
      for its weights and for the learnable temperature.
Each is checked with equal and with uneven slices.
"""
from __future__ import annotations

import itertools
import math
import os
import socket
import sys
import time
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import chapters.ch04_contrastive.reference as ref

WORLD = 2
DEADLINE_S = 90  # a hang fails the test instead of blocking the suite
SPLITS = {"equal": (4, 4), "uneven": (3, 6)}  # rows per rank
D_IMAGE_IN, D_TEXT_IN, D_EMBED = 5, 7, 4  # the tiny projections of case (c)
# The torch backend runs in float64 and must match to rounding; the Triton kernel is
# float32 only (under the interpreter on CPU), with the project's budget for a float32 dot.
DTYPE = {"torch": torch.float64, "triton": torch.float32}
RTOL = {"torch": 1e-12, "triton": 1e-3}


# --------------------------------------------------------------------------- the workers


def _rows(case: dict, rank: int) -> slice:
    """This rank's rows of the global batch: ranks hold consecutive slices, in rank order."""
    start = sum(case["split"][:rank])
    return slice(start, start + case["split"][rank])


def _worker(rank: int, port: int, cases: dict, out_dir: str, backends: list[str]) -> None:
    """One rank: run every case with every backend on this rank's rows, save the results."""
    # Gloo must talk over loopback only (no network): pick the loopback interface.
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from tiny_mm.contrastive import ClipLoss

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=30),  # a collective that never completes raises instead of hanging
    )
    try:
        results = {}
        for backend, (name, case) in itertools.product(backends, cases.items()):
            dtype = DTYPE[backend]
            key = f"{backend}/{name}"  # results are saved under backend/case/...
            rows = _rows(case, rank)

            # (a), (b): the loss on this rank's normalised rows, learnable temperature.
            loss_fn = ClipLoss(init_logit_scale=case["scale"], backend=backend).to(dtype)
            image = torch.tensor(case["image"][rows], dtype=dtype, requires_grad=True)  # (n_r, d)
            text = torch.tensor(case["text"][rows], dtype=dtype, requires_grad=True)  # (n_r, d)
            loss = loss_fn(image, text)
            loss.backward()
            results[f"{key}/loss"] = loss.detach()
            results[f"{key}/d_image"] = image.grad
            results[f"{key}/d_text"] = text.grad
            results[f"{key}/d_log_scale"] = loss_fn.log_logit_scale.grad
            results[f"{key}/log_scale"] = loss_fn.log_logit_scale.detach()

            # (c): linear projections + ClipLoss(normalize=True), wrapped in DDP.
            model = _TinyTwoTower(backend).to(dtype)
            model.load_state_dict({k: torch.tensor(v, dtype=dtype) for k, v in case["weights"].items()})
            ddp = DistributedDataParallel(model)
            x_image = torch.tensor(case["x_image"][rows], dtype=dtype)  # (n_r, D_IMAGE_IN)
            x_text = torch.tensor(case["x_text"][rows], dtype=dtype)  # (n_r, D_TEXT_IN)
            loss = ddp(x_image, x_text)
            loss.backward()  # DDP all-reduces (averages) the parameter gradients here
            for param_name, param in model.named_parameters():
                results[f"{key}/ddp_grad/{param_name}"] = param.grad
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


class _TinyTwoTower(torch.nn.Module):
    """Two linear 'encoders' and the loss: the smallest model whose training needs the gather."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        from tiny_mm.contrastive import ClipLoss

        self.image_proj = torch.nn.Linear(D_IMAGE_IN, D_EMBED)
        self.text_proj = torch.nn.Linear(D_TEXT_IN, D_EMBED)
        self.loss = ClipLoss(normalize=True, backend=backend)

    def forward(self, x_image: torch.Tensor, x_text: torch.Tensor) -> torch.Tensor:
        return self.loss(self.image_proj(x_image), self.text_proj(x_text))  # (n, D_EMBED) each -> 0-dim


# --------------------------------------------------------------------------- the parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_cases(rng: np.random.Generator) -> dict:
    cases = {}
    for name, split in SPLITS.items():
        n = sum(split)
        cases[name] = {
            "split": split,
            "scale": float(rng.uniform(5.0, 30.0)),
            "image": ref.l2_normalize(rng.standard_normal((n, 6))),
            "text": ref.l2_normalize(rng.standard_normal((n, 6))),
            "x_image": rng.standard_normal((n, D_IMAGE_IN)),
            "x_text": rng.standard_normal((n, D_TEXT_IN)),
            "weights": {
                "image_proj.weight": rng.standard_normal((D_EMBED, D_IMAGE_IN)),
                "image_proj.bias": rng.standard_normal(D_EMBED),
                "text_proj.weight": rng.standard_normal((D_EMBED, D_TEXT_IN)),
                "text_proj.bias": rng.standard_normal(D_EMBED),
                "loss.log_logit_scale": np.array(math.log(float(rng.uniform(5.0, 30.0)))),
            },
        }
    return cases


def _have_kernel() -> bool:
    try:
        import kernels
    except ImportError:
        return False
    return hasattr(kernels, "clip_loss")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Spawn WORLD workers once for the module; return (cases, [results of each rank])."""
    backends = ["torch", "triton"] if _have_kernel() else ["torch"]
    rng = np.random.default_rng(zlib.crc32(b"test_distributed_contrastive"))
    cases = _make_cases(rng)
    out_dir = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(
        _worker,
        args=(_free_port(), cases, str(out_dir), backends),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + DEADLINE_S
    while not context.join(timeout=1.0):  # re-raises a worker's exception
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} workers did not finish within {DEADLINE_S} s")
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return cases, results


def assert_close(out, expected, what: str, rtol: float) -> None:
    out = np.asarray(out.double() if isinstance(out, torch.Tensor) else out, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert out.shape == expected.shape, f"{what}: shape {out.shape}, expected {expected.shape}"
    assert np.all(np.isfinite(out)), f"{what}: non-finite values"
    err, scale = np.linalg.norm(out - expected), np.linalg.norm(expected)
    assert err <= rtol * scale, f"{what}: relative error {err / scale:.3e} > {rtol:.0e}"


def _select(run, backend: str, name: str):
    """(case inputs, per-rank results, result key prefix, tolerance) of one backend and split."""
    if backend == "triton" and not _have_kernel():
        pytest.skip("kernels.clip_loss is not there yet")
    cases, results = run
    return cases[name], results, f"{backend}/{name}", RTOL[backend]


@pytest.mark.parametrize("name", list(SPLITS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mean_of_rank_losses_is_full_batch_loss(run, backend, name):
    case, results, key, rtol = _select(run, backend, name)
    s = math.exp(float(results[0][f"{key}/log_scale"]))  # the float32-rounded init, as the ranks used it
    expected = ref.clip_loss(case["image"], case["text"], s)
    mean_loss = sum(float(r[f"{key}/loss"]) for r in results) / WORLD  # what an all_reduce-mean gives
    assert_close(mean_loss, expected, f"{key}: mean over ranks of the loss", rtol)
    losses = [float(r[f"{key}/loss"]) for r in results]
    if backend == "triton":
        # The square kernel computes the full-batch loss on every rank (see ClipLoss.forward).
        for rank, loss in enumerate(losses):
            assert_close(loss, expected, f"{key}: rank {rank}'s loss", rtol)
    else:
        # Each rank's loss is its own share, not the full loss (else the mean would prove nothing).
        assert abs(losses[0] - losses[1]) > 1e-6, f"{key}: both ranks report the same loss {losses[0]}"


@pytest.mark.parametrize("name", list(SPLITS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rank_gradients_are_full_batch_slices(run, backend, name):
    case, results, key, rtol = _select(run, backend, name)
    s = math.exp(float(results[0][f"{key}/log_scale"]))
    d_image, d_text, d_s = ref.clip_loss_grad(case["image"], case["text"], s)
    for rank, r in enumerate(results):
        rows = _rows(case, rank)
        assert_close(r[f"{key}/d_image"] / WORLD, d_image[rows], f"{key}: rank {rank} d_image / W", rtol)
        assert_close(r[f"{key}/d_text"] / WORLD, d_text[rows], f"{key}: rank {rank} d_text / W", rtol)
    # The temperature is one parameter on every rank: DDP would average its gradients.
    mean_d_log_scale = sum(float(r[f"{key}/d_log_scale"]) for r in results) / WORLD
    assert_close(mean_d_log_scale, d_s * s, f"{key}: mean over ranks of d_log_logit_scale", rtol)


@pytest.mark.parametrize("name", list(SPLITS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ddp_gradients_equal_full_batch(run, backend, name):
    case, results, key, rtol = _select(run, backend, name)
    w = case["weights"]
    # Full batch, by hand in float64: raw embeddings -> clip_loss_raw_grad -> linear layers.
    image_raw = case["x_image"] @ w["image_proj.weight"].T + w["image_proj.bias"]  # (N, D_EMBED)
    text_raw = case["x_text"] @ w["text_proj.weight"].T + w["text_proj.bias"]  # (N, D_EMBED)
    s = math.exp(float(torch.tensor(w["loss.log_logit_scale"], dtype=DTYPE[backend]).double()))
    d_image_raw, d_text_raw, d_s = ref.clip_loss_raw_grad(image_raw, text_raw, s)
    expected = {
        "image_proj.weight": d_image_raw.T @ case["x_image"],
        "image_proj.bias": d_image_raw.sum(axis=0),
        "text_proj.weight": d_text_raw.T @ case["x_text"],
        "text_proj.bias": d_text_raw.sum(axis=0),
        "loss.log_logit_scale": np.array(d_s * s),  # s = exp(parameter)
    }
    for rank, r in enumerate(results):
        for param_name, grad in expected.items():
            got = r[f"{key}/ddp_grad/{param_name}"]
            assert_close(got, grad, f"{key}: rank {rank} DDP grad of {param_name}", rtol)
