"""The adapter experiment (`tinymm train adapters`), in very short runs.

- captions are read back into attributes exactly as the dataset's labels say;
- scores and greedy decoding behave on hand-made cases;
- the "perfect encoder" features are the labels, one one-hot token per attribute;
- a short run of each adapter lowers its loss and leaves every frozen weight in place;
- the whole experiment and its command run end to end (tiny sizes, either pretraining
  stream of the language model), the Q-Former
  included when its module is there, skipped and reported when it is not.
"""
import pytest
import torch
from torch import nn

from tiny_mm.data.shapes import ShapesConfig, ShapesDataset
from tiny_mm.data.words import BOS, EOS, PAD, shapes_vocab
from tiny_mm.language_model import LMConfig, next_word_loss, pretrain_lm
from tiny_mm.train_adapters import (
    AdapterConfig,
    ImageEncoder,
    build_captioner,
    caption_scores,
    greedy_captions,
    label_tokens,
    main,
    parse_caption,
    qformer_available,
    run_experiment,
    train_adapter,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread only waits
TINY_LM = LMConfig(width=32, layers=2, heads=2)


def test_parse_caption_recovers_the_dataset_labels():
    config = ShapesConfig(captions="canonical")
    data = ShapesDataset(200, config, seed=3)
    for i in range(len(data)):
        s = data.sample(i)
        labels = data.labels(s)
        parsed = parse_caption(s.caption)
        assert parsed == {"size": config.sizes[labels["size"]], "colour": config.colours[labels["colour"]],
                          "shape": config.shapes[labels["shape"]], "position": config.positions[labels["position"]]}
    assert parse_caption("red red red") == dict.fromkeys(["size", "colour", "shape", "position"])
    assert parse_caption("a big red circle on the left")["size"] is None  # "big" is not canonical


def test_caption_scores_by_hand():
    truth = ["a small red circle on the left", "a large blue star at the top"]
    generated = ["a small red circle on the left", "a large blue square at the top"]
    exact, attributes = caption_scores(generated, truth)
    assert exact == 0.5
    assert attributes == {"size": 1.0, "colour": 1.0, "shape": 0.5, "position": 1.0}
    assert caption_scores(["", "a"], truth) == (0.0, dict.fromkeys(attributes, 0.0))
    with pytest.raises(ValueError, match="as many"):
        caption_scores(generated[:1], truth)


class Scripted(nn.Module):
    """A 'captioner' that writes row b's script, one word per position, whatever the image."""

    def __init__(self, scripts: torch.Tensor) -> None:
        super().__init__()
        self.scripts = scripts  # (B, T)

    def forward(self, ids, features):
        nxt = self.scripts[:, ids.shape[1] - 1]  # (B,) the word after the last one given
        logits = torch.zeros(ids.shape[0], ids.shape[1], 45)
        logits[torch.arange(ids.shape[0]), -1, nxt] = 1.0
        return logits


def test_greedy_captions_stop_at_eos_and_pad_after():
    scripts = torch.tensor([[7, 8, EOS, 9, 9, 9], [7, EOS, 9, 9, 9, 9], [7, 8, 9, 10, 11, 12]])
    ids = greedy_captions(Scripted(scripts), torch.zeros(3, 1, 1), max_len=6)
    assert ids.tolist() == [[BOS, 7, 8, EOS, PAD, PAD], [BOS, 7, EOS, PAD, PAD, PAD], [BOS, 7, 8, 9, 10, 11]]
    early = greedy_captions(Scripted(scripts[:2]), torch.zeros(2, 1, 1), max_len=6)
    assert early.shape == (2, 4)  # stops once every row has ended


@pytest.fixture(scope="module")
def frozen_parts():
    lm, _ = pretrain_lm(TINY_LM, steps=30, batch_size=32, captions=200)
    data = ShapesDataset(48, ShapesConfig(captions="canonical"), seed=5)
    images, captions, _ = data.materialize()
    torch.manual_seed(0)
    encoder = ImageEncoder()
    for p in encoder.parameters():
        p.requires_grad_(False)
    features = torch.randn(48, 17, 64)  # distinct random "images": the loop, not the encoder, is tested here
    ids, _ = shapes_vocab().encode(captions)
    return lm, encoder, features, ids, captions


@pytest.mark.parametrize("name", ["flamingo", "llava", "llava-mlp"])
def test_short_run_lowers_the_loss_and_moves_only_the_adapter(frozen_parts, name):
    lm, encoder, features, ids, captions = frozen_parts
    features, ids = features[:8], ids[:8]  # a tiny batch to overfit
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    config = AdapterConfig(adapters=(name,), steps=80, batch_size=8, lr=1e-2, gate_every=20)
    result = train_adapter(name, lm, encoder, features, ids, config, features[:4], captions[:4])
    assert all(torch.equal(lm.state_dict()[k], v) for k, v in before.items())
    assert 0 < result.trainable < result.total and 0 < result.fraction < 1
    assert 0.0 <= result.exact <= 1.0 and len(result.samples) == 4

    torch.manual_seed(config.seed)  # the captioner as train_adapter built it, before training
    start = build_captioner(name, lm, 64).eval()
    with torch.no_grad():
        first, last = (float(next_word_loss(m(ids, features), ids)) for m in (start, result.model))
        if name == "flamingo":
            # Closed gates: the untrained model is the frozen LM, bit for bit.
            assert torch.equal(start(ids, features), lm(ids))
    assert last < 0.98 * first, f"{name}: loss on the tiny batch {first:.4f} -> {last:.4f}"
    if name == "flamingo":
        assert [s for s, _ in result.gates] == [0, 20, 40, 60, 80]
        assert result.gates[0][1] == {0: (0.0, 0.0)}  # every=2 over 2 blocks: one gated layer, closed
        assert result.gates[-1][1][0] != (0.0, 0.0)  # and opening
    else:
        assert result.gates == []


def test_experiment_and_command_end_to_end(capsys):
    config = AdapterConfig(adapters=("flamingo", "llava", "qformer"), steps=2, batch_size=4, encoder_steps=2,
                           lm_steps=2, lm_stream="captions", train_images=16, eval_images=4, threads=1)
    experiment = run_experiment(config, progress=False)
    names = [r.name for r in experiment.results]
    if qformer_available():
        assert names == ["flamingo", "llava", "qformer"] and experiment.skipped == []
    else:
        assert names == ["flamingo", "llava"] and experiment.skipped == ["qformer"]
    assert main(["--steps", "2", "--batch-size", "4", "--encoder-steps", "2", "--lm-steps", "2",
                 "--train-images", "16", "--eval-images", "4", "--adapters", "llava", "--threads", "1",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "llava" in out and "fraction" in out and "exact" in out
    assert "'context' stream" in out  # the default pretraining text, said in the report
    assert main(["--steps", "2", "--batch-size", "4", "--encoder-steps", "2", "--lm-steps", "2",
                 "--train-images", "16", "--eval-images", "4", "--adapters", "llava,flamingo", "--threads", "1",
                 "--features", "labels", "--quiet"]) == 0
    assert "labels features" in capsys.readouterr().out


def test_bad_config():
    with pytest.raises(ValueError, match="adapters"):
        AdapterConfig(adapters=("blip",))
    with pytest.raises(ValueError, match="steps"):
        AdapterConfig(steps=0)
    with pytest.raises(ValueError, match="features"):
        AdapterConfig(features="pixels")
    with pytest.raises(ValueError, match="lm_stream"):
        AdapterConfig(lm_stream="books")
    assert main(["--steps", "0"]) == 2


def test_label_tokens_are_one_hot_attributes():
    _, _, labels = ShapesDataset(40, ShapesConfig(captions="canonical"), seed=2).materialize()
    tokens = label_tokens(labels)
    counts = [2, 6, 5, 9]  # sizes, colours, shapes, positions of the shapes world
    assert tokens.shape == (40, 4, sum(counts))
    assert torch.equal(tokens.sum(dim=-1), torch.ones(40, 4))  # one 1 per token, zeros elsewhere
    start = 0
    for k, (name, n) in enumerate(zip(["size", "colour", "shape", "position"], counts)):
        block = tokens[:, k, start:start + n]  # (40, n): this attribute's slice
        assert torch.equal(block.argmax(dim=-1), labels[name]) and block.sum() == 40
        start += n
