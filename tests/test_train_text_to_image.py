"""`tinymm train text-to-image`: the machinery at toy sizes (the scores themselves are the chapter's run)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tiny_mm import cli
from tiny_mm.clip import CLIP
from tiny_mm.data.shapes import ShapesConfig, split_by_combinations
from tiny_mm.train_clip import shapes_zero_shot, tiny_clip_config
from tiny_mm.train_text_to_image import (
    ClipJudge,
    TextToImageSettings,
    encode_images,
    main,
    make_images,
    run_experiment,
    sample_diffusion,
    train_denoiser,
    transformer_denoiser,
)
from tiny_mm.denoiser import DenoiserConfig, TextDenoiser
from tiny_mm.unet import TextUNet, UNetConfig
from tiny_mm.vqvae import VQVAE, VQVAEConfig


@pytest.fixture(scope="module")
def quick_result():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_experiment(TextToImageSettings.quick(), progress=False)
    finally:
        torch.set_num_threads(before)


def test_quick_run_has_every_row_and_model(quick_result):
    s = TextToImageSettings.quick()
    labels = [(r.generator, r.setting) for r in quick_result.rows]
    expected = [("real", "images"), ("vqvae", "reconstructed")]
    expected += [("dalle", f"T={t:g}") for t in s.temperature] + [("diffusion", f"w={w:g}") for w in s.guidance]
    assert labels == expected
    for r in quick_result.rows:
        for score in (r.seen, r.heldout):
            for value in (score.match, score.colour, score.shape):
                assert 0 <= value <= 1
            # A match needs the colour and the shape right: it can never exceed either.
            assert score.match <= min(score.colour, score.shape)
    assert set(quick_result.models) == {"vqvae", "dalle", "diffusion"}
    for m in quick_result.models.values():
        assert m["params"] > 0 and m["seconds"] > 0 and np.isfinite(m["final_loss"])


def test_the_grid_holds_one_prompt_per_pair(quick_result):
    seen, heldout = split_by_combinations(ShapesConfig())
    prompts = quick_result.grid_prompts
    assert len(prompts) == 2 * len(heldout)
    for (colour, shape), prompt in zip(heldout, prompts):  # the held-out pairs come first, in order
        assert f"{colour} {shape}" in prompt
    for key, grid in quick_result.samples.items():
        assert grid.dtype == np.uint8 and grid.shape[0] == len(prompts) and grid.shape[2:] == (32, 32, 3), key


def test_save_writes_results_and_samples(quick_result, tmp_path):
    folder = quick_result.save(tmp_path / "run")
    found = json.loads((folder / "results.json").read_text())
    assert [r["setting"] for r in found["rows"]] == [r.setting for r in quick_result.rows]
    assert found["settings"]["dalle_steps"] == TextToImageSettings.quick().dalle_steps
    with np.load(folder / "samples.npz") as samples:
        assert list(samples["prompts"]) == quick_result.grid_prompts
        assert np.array_equal(samples["diffusion w=1"], quick_result.samples["diffusion w=1"])


def test_judge_classifies_as_chapter_5_does(rng):
    # An untrained tiny CLIP still has definite (if arbitrary) opinions: the judge must share them
    # with chapter 5's zero-shot function on the same images.
    torch.manual_seed(int(rng.integers(2**31)))
    clip = CLIP(tiny_clip_config()).eval()
    pairs = ShapesConfig().combinations
    found = shapes_zero_shot(clip, pairs, n_images=24, seed=int(rng.integers(1000)))
    assert torch.equal(ClipJudge(clip).classify(found["images"]), found["pred"])


def test_judge_scores_colour_shape_and_both(monkeypatch, rng):
    torch.manual_seed(0)
    judge = ClipJudge(CLIP(tiny_clip_config()).eval())
    classes = ShapesConfig().combinations
    truth = torch.as_tensor(rng.integers(0, len(classes), 40))
    seen = torch.as_tensor(rng.integers(0, len(classes), 40))
    monkeypatch.setattr(judge, "classify", lambda images: seen)
    score = judge.score(torch.zeros(40, 3, 32, 32), truth)
    pairs = [(classes[a], classes[b]) for a, b in zip(seen.tolist(), truth.tolist())]
    assert score.match == np.mean([a == b for a, b in pairs])
    assert score.colour == np.mean([a[0] == b[0] for a, b in pairs])
    assert score.shape == np.mean([a[1] == b[1] for a, b in pairs])


def test_make_images_and_encode(rng):
    pairs = [("red", "circle"), ("blue", "star")]
    data = make_images(12, pairs, int(rng.integers(1000)), captions="canonical")
    assert data.images.shape == (12, 3, 32, 32) and data.ids.shape == (12, 16)
    all_pairs = ShapesConfig().combinations
    for caption, cls in zip(data.captions, data.classes.tolist()):
        colour, shape = all_pairs[cls]
        assert (colour, shape) in pairs and f"{colour} {shape}" in caption
    vqvae = VQVAE(VQVAEConfig(hidden=8, code_dim=4, num_codes=8)).eval()
    codes, latents = encode_images(vqvae, data.images, batch=5)  # batches that do not divide 12
    with torch.no_grad():
        assert torch.equal(codes, vqvae.encode(data.images))
        assert torch.allclose(latents, vqvae.encode_latents(data.images))


def test_diffusion_samples_are_images(quick_result):
    s = TextToImageSettings.quick()
    data = make_images(3, [("green", "cross")], 7, captions="canonical")
    from tiny_mm.denoiser import Caption

    denoiser, schedule = (quick_result.trained[k] for k in ("diffusion", "schedule"))
    make = lambda seed: sample_diffusion(denoiser, schedule, Caption(data.ids, data.lengths), guidance=2.0,
                                         steps=s.sample_steps, generator=torch.Generator().manual_seed(seed))
    images = make(3)
    assert images.shape == (3, 3, 32, 32) and float(images.min()) >= 0 and float(images.max()) <= 1
    assert torch.equal(images, make(3))  # DDIM with eta = 0: the start noise decides everything


@pytest.mark.parametrize("kwargs, message", [
    ({"generators": ("gan",)}, "generators"),
    ({"guidance": ()}, "guidance"),
    ({"temperature": (-1.0,)}, "temperature"),
    ({"schedule": "quadratic"}, "schedule"),
    ({"caption_dropout": 1.0}, "caption_dropout"),
    ({"batch_size": 10_000}, "larger than"),
    ({"top_k": 0}, "top_k"),
    ({"sizes": ("huge",)}, "sizes"),
    ({"vqvae": VQVAEConfig(num_codes=32)}, "num_codes"),
    ({"vqvae": VQVAEConfig(image_size=16)}, "32"),
    ({"loss_weighting": "snr"}, "loss_weighting"),
    ({"space": "latents"}, "the U-Net denoises pixels"),
    ({"denoiser": UNetConfig(patch=8)}, "the U-Net denoises pixels"),
    ({"denoiser": DenoiserConfig(width=32, prediction="eps")}, "with prediction 'eps'"),
    ({"denoiser": VQVAEConfig()}, "UNetConfig or DenoiserConfig"),
])
def test_settings_refuse_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextToImageSettings(**kwargs)


def test_command_line(tmp_path, capsys):
    assert cli.TRAINERS["text-to-image"] == "tiny_mm.train_text_to_image"
    assert main(["--quick", "--quiet", "--generators", "dalle", "--temperature", "1", "--out",
                 str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "prompt match" in out and "dalle      T=1" in out and "diffusion" not in out.split("prompt match")[1]
    assert (tmp_path / "out" / "results.json").is_file() and (tmp_path / "out" / "samples.npz").is_file()


def test_the_default_diffusion_is_the_unet_and_the_transformer_runs_on_pixels_and_latents(quick_result, capsys):
    assert isinstance(quick_result.trained["diffusion"], TextUNet)
    for space in ("pixels", "latents"):
        settings = TextToImageSettings.quick(
            generators=("diffusion",), guidance=(2.0,), prompts=2, space=space,
            denoiser=transformer_denoiser(VQVAEConfig(hidden=16, code_dim=8, num_codes=16), space, quick=True))
        result = run_experiment(settings, progress=False)
        assert isinstance(result.trained["diffusion"], TextDenoiser)
        assert result.rows[-1].generator == "diffusion" and np.isfinite(result.models["diffusion"]["final_loss"])
    assert main(["--quick", "--quiet", "--generators", "diffusion", "--space", "latents", "--prompts", "2",
                 "--guidance", "1"]) == 0
    assert "diffusion  w=1" in capsys.readouterr().out
    assert main(["--quick", "--quiet", "--space", "latents", "--denoiser", "unet"]) == 2
    assert "the U-Net denoises pixels" in capsys.readouterr().err


def test_x0_weighting_weighs_each_example_by_its_noise_share():
    # The loss of one step, recomputed by hand from the same draws: (1 - abar_t) ||v - v_hat||^2 / (N C), averaged.
    from tiny_mm.denoiser import Caption, caption_dropout, patchify
    from tiny_mm.diffusion import NoiseSchedule

    for weighting in ("x0", "v"):
        settings = TextToImageSettings.quick(diffusion_steps=1, lr=1e-12, warmup=0, loss_weighting=weighting)
        data = make_images(settings.batch_size * 2, split_by_combinations(ShapesConfig())[0], 3, sizes=("large",))
        model, schedule, losses = train_denoiser(patchify(data.images), data, settings)
        draws = torch.Generator().manual_seed(settings.seed)
        x0 = patchify(data.images) * 2 - 1
        rows = torch.randint(len(x0), (settings.batch_size,), generator=draws)
        t, eps, x_t = schedule.training_example(x0[rows], draws)
        caption = caption_dropout(Caption(data.ids[rows], data.lengths[rows]), settings.caption_dropout, draws)
        fresh = TextUNet(settings.denoiser)  # predicts 0, as the trained one did before its first step
        with torch.no_grad():
            err = (fresh(x_t, t, caption) - schedule.v_target(x0[rows], t, eps)).square().mean(dim=(1, 2))
        abar = schedule.alphas_cumprod[t]
        expected = ((1 - abar) * err.double()).mean() if weighting == "x0" else err.mean()
        assert abs(losses[0] - float(expected)) < 1e-5 * float(expected)


def test_command_line_errors(tmp_path, capsys):
    assert main(["--quick", "--quiet", "--clip", str(tmp_path / "missing.safetensors")]) == 2
    assert "tinymm train clip --out" in capsys.readouterr().err
    assert main(["--quick", "--quiet", "--guidance", "x"]) == 2
    assert "could not convert" in capsys.readouterr().err


def test_command_line_bad_setting(capsys):
    assert main(["--quick", "--generators", "gan"]) == 2
    assert "generators must be" in capsys.readouterr().err
