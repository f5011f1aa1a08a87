"""tiny_mm.checkpoints: Hugging Face CLIPModel state dicts, TorchScript archives, malicious files.

Hugging Face's transformers.CLIPModel is an independent implementation of
CLIP with its own parameter names (separate q/k/v projections, projections
stored as nn.Linear weights): a small random one, renamed by
`from_hugging_face` and loaded by `load_clip`, must give the same image and
text embeddings as transformers' own get_image_features / get_text_features.
Nothing is downloaded.
"""
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
import transformers

from tiny_mm.checkpoints import config_from_state_dict, from_hugging_face, load_clip, read_torchscript_state_dict
from tiny_mm.clip import CLIPConfig, TextConfig
from tiny_mm.tokenizer import tokenize
from tiny_mm.vit import VisionConfig
from tests.numerics import rel_err


torch.set_num_threads(2)

CAPTIONS = [
    "a photo of a cat.",
    "A RED Square, top-left!!",
    "two dogs & 3 birds (maybe 4?) — on the grass",
    " ".join(["a very long caption"] * 30),  # truncated to 77 tokens, end token kept
]


def features(output):
    """transformers 5 returns a ModelOutput whose pooler_output is the projected embedding; 4 a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def small_hf_clip(rng, hidden_act: str):
    """A random transformers.CLIPModel: vision width 128 (2 heads of 64), text width 64, 2 layers each.

    Heads are width // 64 because the head count is not in a state dict and
    `config_from_state_dict` assumes CLIP's 64-wide heads. Every parameter is
    redrawn (LayerNorms and logit_scale too), so no default value hides a mapping error.
    """
    torch.manual_seed(int(rng.integers(2**31)))
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                         vocab_size=49408, max_position_embeddings=77, hidden_act=hidden_act),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=48,
    )
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if name == "logit_scale" else 0.2
            p.copy_(torch.from_numpy(np.asarray(scale * rng.standard_normal(tuple(p.shape)))))
    return model


def check_matches(ours, theirs, rng):
    images = torch.from_numpy(rng.standard_normal((2, 3, 32, 32))).float()
    tokens = tokenize(CAPTIONS)  # (4, 77): one end token (49407) per row, then zeros
    with torch.no_grad():
        assert rel_err(ours.encode_image(images), features(theirs.get_image_features(pixel_values=images))) < 1e-5
        assert rel_err(ours.encode_text(tokens), features(theirs.get_text_features(input_ids=tokens))) < 1e-5
    assert float(ours.logit_scale.detach()) == float(theirs.logit_scale.detach())


@pytest.mark.parametrize("hidden_act, quick_gelu", [("quick_gelu", True), ("gelu", False)])
def test_hugging_face_state_dict_matches_transformers(rng, hidden_act, quick_gelu):
    theirs = small_hf_clip(rng, hidden_act)
    ours = load_clip(theirs.state_dict(), quick_gelu=quick_gelu)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    check_matches(ours, theirs, rng)


def test_hugging_face_safetensors_file_matches_transformers(rng, tmp_path):
    """The file transformers itself writes (save_pretrained: config.json + model.safetensors)."""
    theirs = small_hf_clip(rng, "quick_gelu")
    theirs.save_pretrained(tmp_path)
    ours = load_clip(tmp_path / "model.safetensors", quick_gelu=True)
    check_matches(ours, theirs, rng)


def test_hugging_face_sizes_are_inferred(rng):
    theirs = small_hf_clip(rng, "quick_gelu")
    assert config_from_state_dict(theirs.state_dict()) == CLIPConfig(
        embed_dim=48,
        vision=VisionConfig(image_size=32, patch_size=8, width=128, layers=2, heads=2, output_dim=48),
        text=TextConfig(context_length=77, vocab_size=49408, width=64, heads=1, layers=2),
    )


def test_hugging_face_qkv_packing_order(rng):
    """in_proj_weight stacks q, k, v rows in that order (nn.MultiheadAttention's layout)."""
    state = small_hf_clip(rng, "quick_gelu").state_dict()
    ours = from_hugging_face(state)
    prefix = "vision_model.encoder.layers.1.self_attn."
    packed = ours["visual.transformer.resblocks.1.attn.in_proj_weight"]  # (3 * 128, 128)
    assert packed.shape == (384, 128)
    for i, x in enumerate("qkv"):
        assert torch.equal(packed[128 * i:128 * (i + 1)], state[prefix + f"{x}_proj.weight"])
    assert torch.equal(ours["visual.proj"], state["visual_projection.weight"].t())  # (width, E)


def test_hugging_face_position_ids_buffer_is_dropped(rng):
    """Older transformers saved text_model.embeddings.position_ids; it holds no weights."""
    theirs = small_hf_clip(rng, "quick_gelu")
    state = dict(theirs.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # (1, 77)
    check_matches(load_clip(state), theirs, rng)


@pytest.mark.parametrize("key", [
    "text_model.encoder.layers.1.self_attn.k_proj.bias",
    "vision_model.post_layernorm.weight",
    "visual_projection.weight",
])
def test_hugging_face_missing_key_is_named(rng, key):
    state = dict(small_hf_clip(rng, "quick_gelu").state_dict())
    del state[key]
    with pytest.raises(ValueError, match=rf"missing keys \['{key}'\]"):
        load_clip(state)


def test_hugging_face_unexpected_key_is_named(rng):
    state = dict(small_hf_clip(rng, "quick_gelu").state_dict())
    state["vision_model.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['vision_model.extra.weight'\]"):
        load_clip(state)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_clip(tmp_path / "nope.pt")


class _Payload:
    """Unpickling this calls os.system: the attack weights_only loading must stop."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_clip(path)
    assert not marker.exists()
    # The payload really is an attack: plain unpickling (never done by tiny_mm) runs the command.
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


class _Views(torch.nn.Module):
    """Half-precision weights and a strided view sharing their storage: the reader must keep both."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 4).half()
        self.register_buffer("view", self.lin.weight.data[1:, ::2])  # (3, 3), offset 6, strides (6, 2)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_torchscript_reader_keeps_dtypes_offsets_and_strides(tmp_path):
    module = _Views()
    path = tmp_path / "views.pt"
    torch.jit.script(module).save(str(path))
    state = read_torchscript_state_dict(path)
    expected = module.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert state[key].dtype == value.dtype and torch.equal(state[key], value), key


def test_malicious_torchscript_archive_is_refused(tmp_path):
    """A zip laid out like a TorchScript archive whose data.pkl calls os.system: never run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/code/__torch__/model.py", "")
        archive.writestr("evil/data.pkl", pickle.dumps(_Payload(marker), protocol=2))
    with pytest.raises(ValueError, match="refusing to load global"):
        load_clip(path)
    assert not marker.exists()
