"""Zero-shot classification (tiny_mm.zeroshot) and the CIFAR-10 reader (tiny_mm.data.cifar).

A stand-in model replaces CLIP: its "tokens" are (class id, template id) pairs and its
"images" carry their embedding in the first pixels, so every expected number is known
independently of the code under test.
"""

import numpy as np
import pytest
import torch
from torch import nn

from tiny_mm import zeroshot as zs
from tiny_mm.data.cifar import CIFAR10_CLASSES, load_cifar10, write_mini_cifar10

C, T, E = 10, 4, 16


class StandIn(nn.Module):
    """encode_text: row (class, template) -> table[class, template]; encode_image: first E pixels."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table, requires_grad=False)  # (C, T, E)

    def encode_text(self, tokens):  # (P, 2) -> (P, E)
        return self.table[tokens[:, 0], tokens[:, 1]]

    def encode_image(self, images):  # (B, 3, 4, 4) -> (B, E)
        return images.flatten(1)[:, :E]


CLASSES = [f"class{c}" for c in range(C)]
TEMPLATES = [f"t{t} {{}}" for t in range(T)]


def tokenize(texts):
    """'t{j} class{i}' -> [i, j]."""
    rows = [[int(s.split()[1][5:]), int(s.split()[0][1:])] for s in texts]
    return torch.tensor(rows, dtype=torch.long)


def make_table(rng, signal=3.0):
    """(C, T, E) prompt embeddings pointing at their class axis, with per-prompt noise and scale."""
    table = rng.normal(size=(C, T, E))
    table[np.arange(C), :, np.arange(C)] += signal
    table *= rng.uniform(0.5, 4.0, size=(C, T, 1))  # unequal norms: the per-prompt normalisation matters
    return table


def images_for(labels, rng, noise=0.1):
    """(B, 3, 4, 4) images whose first E pixels are one-hot(label) + noise."""
    x = rng.normal(scale=noise, size=(len(labels), 3 * 4 * 4))
    x[np.arange(len(labels)), labels] += 1.0
    return torch.tensor(x.reshape(-1, 3, 4, 4), dtype=torch.float32)


def numpy_ensemble(table):
    """Independent float64 ensemble: normalise each prompt, mean, normalise. (E, C)."""
    unit = table / np.linalg.norm(table, axis=-1, keepdims=True)
    mean = unit.mean(axis=1)  # (C, E)
    return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).T


def test_templates_are_the_18_cifar_prompts():
    assert len(zs.CIFAR10_TEMPLATES) == 18 and len(set(zs.CIFAR10_TEMPLATES)) == 18
    assert all(t.count("{}") == 1 for t in zs.CIFAR10_TEMPLATES)
    assert zs.SINGLE_TEMPLATE[0] in zs.CIFAR10_TEMPLATES
    assert list(zs.CIFAR10_CLASSES) == ["airplane", "automobile", "bird", "cat", "deer",
                                       "dog", "frog", "horse", "ship", "truck"]


def test_ensemble_matches_numpy(rng):
    table = make_table(rng)
    model = StandIn(torch.tensor(table, dtype=torch.float32))
    W = zs.build_classifier(model, CLASSES, TEMPLATES, tokenize)
    ref = numpy_ensemble(table)
    assert W.shape == (E, C)
    assert np.isfinite(W.numpy()).all()
    assert np.linalg.norm(W.numpy() - ref) / np.linalg.norm(ref) < 1e-5
    # A plain (unnormalised) mean is a different classifier: the test can tell them apart.
    plain = table.mean(axis=1).T
    plain = plain / np.linalg.norm(plain, axis=0, keepdims=True)
    assert np.linalg.norm(W.numpy() - plain) > 1e-3


def test_single_template_is_one_prompt_and_differs_from_ensemble(rng):
    table = make_table(rng)
    model = StandIn(torch.tensor(table, dtype=torch.float32))
    single = zs.build_classifier(model, CLASSES, TEMPLATES[:1], tokenize)
    ref = (table[:, 0] / np.linalg.norm(table[:, 0], axis=-1, keepdims=True)).T
    assert np.linalg.norm(single.numpy() - ref) / np.linalg.norm(ref) < 1e-5
    ens = zs.build_classifier(model, CLASSES, TEMPLATES, tokenize)
    assert (single - ens).norm() > 1e-2


def test_perfect_model_scores_one_and_shuffled_labels_near_chance(rng):
    model = StandIn(torch.tensor(make_table(rng, signal=8.0), dtype=torch.float32))
    W = zs.build_classifier(model, CLASSES, TEMPLATES, tokenize)
    labels = np.repeat(np.arange(C), 40)
    logits = zs.predict(model, images_for(labels, rng), W)
    assert logits.shape == (len(labels), C)
    acc = zs.accuracy(logits, torch.tensor(labels))
    assert acc["top1"] == 1.0 and acc["top5"] == 1.0
    shuffled = zs.accuracy(logits, torch.tensor(rng.permutation(labels)))
    assert shuffled["top1"] < 0.25  # chance is 0.1; 400 samples
    assert shuffled["top5"] >= shuffled["top1"]


def test_accuracy_against_numpy_topk(rng):
    logits = rng.normal(size=(64, C))
    labels = rng.integers(0, C, size=64)
    acc = zs.accuracy(torch.tensor(logits), torch.tensor(labels))
    order = np.argsort(-logits, axis=1)
    for k in (1, 5):
        ref = np.mean([labels[i] in order[i, :k] for i in range(64)])
        assert acc[f"top{k}"] == pytest.approx(ref)
    assert acc["top5"] >= acc["top1"]


def test_confusion_matrix_counts(rng):
    pred = rng.integers(0, C, size=200)
    labels = rng.integers(0, C, size=200)
    cm = zs.confusion_matrix(torch.tensor(pred), torch.tensor(labels), C)
    ref = np.zeros((C, C), dtype=np.int64)
    np.add.at(ref, (labels, pred), 1)
    assert (cm.numpy() == ref).all()
    assert cm.sum() == 200
    assert (cm.sum(dim=1).numpy() == np.bincount(labels, minlength=C)).all()  # rows: true class
    with pytest.raises(ValueError, match="0..9"):
        zs.confusion_matrix(torch.tensor([10]), torch.tensor([0]), C)


def test_bad_inputs_raise():
    model = StandIn(torch.zeros(C, T, E))
    with pytest.raises(ValueError, match="template"):
        zs.build_classifier(model, CLASSES, ["no slot"], tokenize)
    with pytest.raises(ValueError, match="images"):
        zs.predict(model, torch.zeros(2, 48), torch.zeros(E, C))
    with pytest.raises(ValueError, match="logits"):
        zs.accuracy(torch.zeros(3, C), torch.zeros(4, dtype=torch.long))


def test_evaluate_over_a_loader(rng):
    model = StandIn(torch.tensor(make_table(rng, signal=8.0), dtype=torch.float32))
    W = zs.build_classifier(model, CLASSES, TEMPLATES, tokenize)
    labels = np.repeat(np.arange(C), 3)
    data = torch.utils.data.TensorDataset(images_for(labels, rng), torch.tensor(labels))
    out = zs.evaluate(model, torch.utils.data.DataLoader(data, batch_size=7), W, progress=False)
    assert out["n"] == 30 and out["top1"] == 1.0
    assert (out["confusion"].numpy() == 3 * np.eye(C, dtype=np.int64)).all()


def test_mini_cifar_is_read_by_torchvision(tmp_path):
    write_mini_cifar10(tmp_path, n_per_class=2, seed=0)
    test = load_cifar10(tmp_path, verify_md5=False)
    train = load_cifar10(tmp_path, train=True, verify_md5=False)
    assert len(test) == 20 and len(train) == 100
    assert test.classes == list(CIFAR10_CLASSES)
    assert sorted(test.targets) == sorted(list(range(10)) * 2)
    image, label = test[0]
    assert np.asarray(image).shape == (32, 32, 3) and np.asarray(image).dtype == np.uint8
    assert label == test.targets[0]
    # The real MD5 sums reject the miniature copy unless told otherwise, with a message that says so.
    with pytest.raises(ValueError, match="MD5") as err:
        load_cifar10(tmp_path)
    assert str((tmp_path / "cifar-10-batches-py").resolve()) in str(err.value)


def test_missing_cifar_names_the_path(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_cifar10(where)
    msg = str(err.value)
    assert str((where / "cifar-10-batches-py").resolve()) in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg and "download=True" in msg


def test_clip_preprocess_against_numpy(rng):
    from PIL import Image

    # 48 x 40 (W x H): the shorter side (40) is resized to 16, then the width is cropped.
    pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = zs.clip_preprocess(16)(image)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    # Independent: PIL's bicubic resize and the crop by hand, then CLIP's statistics in NumPy.
    resized = np.asarray(image.resize((19, 16), Image.BICUBIC), dtype=np.float64) / 255.0  # (16, 19, 3)
    left = int(round((19 - 16) / 2.0))
    crop = resized[:, left:left + 16]  # (16, 16, 3)
    ref = ((crop - np.array(zs.CLIP_MEAN)) / np.array(zs.CLIP_STD)).transpose(2, 0, 1)
    # torchvision resizes a PIL image with PIL itself: the same bytes, so float32 rounding only.
    assert np.linalg.norm(out.numpy() - ref) / np.linalg.norm(ref) < 1e-5


def _tiny_clip_checkpoint(tmp_path):
    from tiny_mm.clip import CLIP, CLIPConfig, TextConfig
    from tiny_mm.vit import VisionConfig

    # One head per tower: a state dict cannot tell the number of heads, and load_clip
    # assumes CLIP's width // 64 (at least 1).
    torch.manual_seed(0)
    config = CLIPConfig(
        embed_dim=16,
        vision=VisionConfig(image_size=32, patch_size=16, width=32, layers=1, heads=1, output_dim=16),
        text=TextConfig(width=32, heads=1, layers=1),
    )
    model = CLIP(config).eval()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    return model, path


def test_main_defaults_to_the_18_template_ensemble(tmp_path, capsys):
    """`tinymm zeroshot` without --templates: the printed accuracy is the 18-template ensemble's."""
    import re

    from tiny_mm.tokenizer import tokenize

    model, path = _tiny_clip_checkpoint(tmp_path)
    write_mini_cifar10(tmp_path, n_per_class=2, seed=3)
    rc = zs.main(["--checkpoint", str(path), "--data-dir", str(tmp_path), "--batch-size", "8",
                  "--no-verify-md5"])
    out = capsys.readouterr().out
    assert rc == 0 and "18 template(s)" in out and "20 images" in out
    printed = float(re.search(r"top-1 ([0-9.]+)%", out).group(1)) / 100

    # Independent: every (class, template) prompt encoded, the ensemble averaged in float64 NumPy.
    data = load_cifar10(tmp_path, transform=zs.clip_preprocess(32), verify_md5=False)
    images = torch.stack([data[i][0] for i in range(len(data))])  # (20, 3, 32, 32)
    labels = np.array(data.targets)
    prompts = [t.format(c) for c in CIFAR10_CLASSES for t in zs.CIFAR10_TEMPLATES]
    with torch.no_grad():
        text = model.encode_text(tokenize(prompts)).double().numpy()  # (10 * 18, E)
        image = model.encode_image(images).double().numpy()  # (20, E)
    W = numpy_ensemble(text.reshape(10, 18, -1))  # (E, 10)
    pred = (image / np.linalg.norm(image, axis=1, keepdims=True) @ W).argmax(1)
    assert printed == pytest.approx((pred == labels).mean(), abs=1e-4)


def test_main_end_to_end_on_mini_cifar(tmp_path, capsys):
    _, path = _tiny_clip_checkpoint(tmp_path)
    write_mini_cifar10(tmp_path, n_per_class=1, seed=1)
    rc = zs.main(["--checkpoint", str(path), "--dataset", "cifar10", "--data-dir", str(tmp_path),
                  "--templates", "single", "--batch-size", "4", "--limit", "8", "--no-verify-md5"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "8 images" in out and "1 template(s)" in out and "top-1" in out and "top-5" in out
    # Missing data: a clear error and a non-zero exit, not a traceback.
    assert zs.main(["--checkpoint", str(path), "--data-dir", str(tmp_path / "none")]) == 1
    assert str((tmp_path / "none").resolve()) in capsys.readouterr().err
