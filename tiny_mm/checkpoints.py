"""Reading CLIP checkpoints into `tiny_mm.clip.CLIP`, without running code from the file.

    load_clip(path or state dict) -> CLIP       the entry point
    config_from_state_dict(state)  -> CLIPConfig   sizes inferred from the tensors' shapes
    from_hugging_face(state)       -> state        transformers.CLIPModel names -> OpenAI names
    read_torchscript_state_dict(path) -> state     OpenAI's released TorchScript archives

Three layouts are read:

- OpenAI / open_clip state dicts (``visual.*``, ``transformer.*``, ...), saved with
  torch.save (.pt, .bin, read with ``weights_only=True``) or as .safetensors.
  `CLIP`'s parameter names are these, so they load with strict keys.
- OpenAI's released ``.pt`` files, TorchScript archives: a restricted unpickler
  rebuilds the tensors and refuses everything else.
- Hugging Face ``transformers.CLIPModel`` state dicts (``text_model.*``,
  ``vision_model.*``, e.g. a ``model.safetensors``): renamed to OpenAI's names,
  and the separate q/k/v projections packed into one ``in_proj_weight``.
"""
from __future__ import annotations

import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from tiny_mm.clip import CLIP, HEAD_WIDTH, CLIPConfig, ResNetConfig, TextConfig
from tiny_mm.vit import VisionConfig

__all__ = [
    "config_from_state_dict", "from_hugging_face", "is_hugging_face", "load_clip", "load_whisper",
    "read_torchscript_state_dict",
]


# ---------------------------------------------------------------------------------------------
# Sizes from shapes
# ---------------------------------------------------------------------------------------------

def _layer_count(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    """Number of blocks under ``prefix`` (e.g. "visual.transformer.resblocks."), from the keys."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for key in state_dict if (m := pattern.match(key))}
    if not indices:
        raise ValueError(f"state dict has no '{prefix}{{i}}.' keys")
    if indices != set(range(len(indices))):
        raise ValueError(f"'{prefix}{{i}}' indices are not 0..n-1: {sorted(indices)}")
    return len(indices)


def _mlp_ratio(state_dict: Mapping[str, Tensor], prefix: str, width: int) -> float:
    hidden = _shape(state_dict, prefix + "0.mlp.c_fc.weight")[0]  # c_fc.weight is (hidden, width)
    ratio = hidden / width
    if int(width * ratio) != hidden:  # our MLP builds int(width * ratio) units
        raise ValueError(f"MLP hidden size {hidden} is not int({width} * ratio) for any float ratio")
    return ratio


def _shape(state_dict: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise ValueError(f"state dict has no '{key}'")
    return tuple(state_dict[key].shape)


def _vit_config(state_dict: Mapping[str, Tensor], quick_gelu: bool) -> VisionConfig:
    width, _, patch, _ = _shape(state_dict, "visual.conv1.weight")  # (width, 3, P, P)
    num_tokens = _shape(state_dict, "visual.positional_embedding")[0]  # N + 1
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"visual.positional_embedding has {num_tokens} rows: not a square grid + 1")
    return VisionConfig(
        image_size=grid * patch,
        patch_size=patch,
        width=width,
        layers=_layer_count(state_dict, "visual.transformer.resblocks."),
        heads=max(width // HEAD_WIDTH, 1),
        mlp_ratio=_mlp_ratio(state_dict, "visual.transformer.resblocks.", width),
        output_dim=_shape(state_dict, "visual.proj")[1],  # (width, E)
        quick_gelu=quick_gelu,
    )


def _resnet_config(state_dict: Mapping[str, Tensor]) -> ResNetConfig:
    width = _shape(state_dict, "visual.conv3.weight")[0]  # the stem's last conv: (w, w/2, 3, 3)
    num_tokens = _shape(state_dict, "visual.attnpool.positional_embedding")[0]  # (H/32)^2 + 1
    grid = math.isqrt(num_tokens - 1)
    if grid * grid != num_tokens - 1:
        raise ValueError(f"visual.attnpool.positional_embedding has {num_tokens} rows: not a square grid + 1")
    return ResNetConfig(
        layers=tuple(_layer_count(state_dict, f"visual.layer{k}.") for k in range(1, 5)),
        width=width,
        image_size=grid * 32,  # the tower downsamples 32 times
        heads=max(width * 32 // HEAD_WIDTH, 1),
        output_dim=_shape(state_dict, "visual.attnpool.c_proj.weight")[0],  # (E, 32 w)
    )


# ANCHOR: config_from_state_dict
def config_from_state_dict(state_dict: Mapping[str, Tensor], *, quick_gelu: bool = True) -> CLIPConfig:
    """Infer a CLIP's sizes (ViT or ResNet image tower) from its tensors' shapes.

    Every size is read from a shape, except two things the weights cannot tell:
    the number of heads (splitting width into heads reshapes nothing stored), set
    as in all of CLIP's released models to width // 64 (ResNet: 32 width // 64,
    the attention pool's channels over 64), and the activation of the
    transformers' MLPs, which the caller gives with ``quick_gelu``.
    A Hugging Face state dict is renamed first (`from_hugging_face`).
    """
    if is_hugging_face(state_dict):
        state_dict = from_hugging_face(state_dict)
    if "visual.conv1.weight" not in state_dict:
        raise ValueError("state dict has no 'visual.conv1.weight': not a CLIP state dict")
    if "visual.attnpool.c_proj.weight" in state_dict:
        vision: VisionConfig | ResNetConfig = _resnet_config(state_dict)
    else:
        vision = _vit_config(state_dict, quick_gelu)
    vocab_size, text_width = _shape(state_dict, "token_embedding.weight")  # (vocab, width)
    text = TextConfig(
        context_length=_shape(state_dict, "positional_embedding")[0],  # (L, width)
        vocab_size=vocab_size,
        width=text_width,
        heads=max(text_width // HEAD_WIDTH, 1),
        layers=_layer_count(state_dict, "transformer.resblocks."),
        mlp_ratio=_mlp_ratio(state_dict, "transformer.resblocks.", text_width),
        quick_gelu=quick_gelu,
    )
    embed_dim = _shape(state_dict, "text_projection")[1]  # (text width, E)
    return CLIPConfig(embed_dim=embed_dim, vision=vision, text=text)
# ANCHOR_END: config_from_state_dict


# ---------------------------------------------------------------------------------------------
# Hugging Face names
# ---------------------------------------------------------------------------------------------

# ANCHOR: hugging_face
# transformers.CLIPModel name -> OpenAI name, for the tensors outside the blocks.
_HF_NAMES = {
    "logit_scale": "logit_scale",
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",  # an nn.Embedding there
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "text_projection.weight": "text_projection",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",  # a conv without bias in both
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # "layrnorm": HF's own spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "visual_projection.weight": "visual.proj",
}
# HF keeps the projections as nn.Linear weights (E, width); OpenAI multiplies x @ proj, (width, E).
_HF_TRANSPOSED = {"text_projection.weight", "visual_projection.weight"}
# Inside block i: HF suffix -> OpenAI suffix (q/k/v are packed separately).
_HF_BLOCK_NAMES = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
}
_HF_TOWERS = {"text_model.encoder.layers.": "transformer.resblocks.",
              "vision_model.encoder.layers.": "visual.transformer.resblocks."}


def is_hugging_face(state_dict: Mapping[str, Tensor]) -> bool:
    """True for a transformers.CLIPModel state dict (its towers are ``text_model`` and ``vision_model``)."""
    return any(key.startswith(("text_model.", "vision_model.")) for key in state_dict)


def from_hugging_face(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A transformers.CLIPModel state dict under OpenAI's names, ready for `CLIP`.

    q_proj, k_proj, v_proj (each (width, width)) become one in_proj_weight
    (3 width, width) with the rows in that order, as nn.MultiheadAttention packs
    them; the two projections are transposed; the rest is renamed. Every
    expected key must be there and no other: ValueError names the HF keys that
    are missing or unexpected. ``position_ids`` buffers (older transformers
    saved them) hold no weights and are dropped.

    What the names do not say, and is the same: HF pools the text at the
    end-of-text token too, found as the first position holding eos_token_id
    (49407), or by argmax of the ids in configs with the legacy eos_token_id 2;
    for `tiny_mm.tokenize` output (one 49407, then zero padding) both are our
    ``tokens.argmax(-1)``. HF's config names the activation (hidden_act
    "quick_gelu" for OpenAI's models), which a state dict does not carry: the
    caller still passes ``quick_gelu`` to `load_clip`.
    """
    state = {k: v for k, v in state_dict.items() if not k.endswith("position_ids")}
    names = dict(_HF_NAMES)  # HF name -> OpenAI name
    packed: dict[str, list[str]] = {}  # OpenAI in_proj name -> its HF q, k, v names
    for hf_prefix, prefix in _HF_TOWERS.items():
        for i in range(_layer_count(state, hf_prefix)):
            for hf, ours in _HF_BLOCK_NAMES.items():
                names[f"{hf_prefix}{i}.{hf}"] = f"{prefix}{i}.{ours}"
            for kind in ("weight", "bias"):
                packed[f"{prefix}{i}.attn.in_proj_{kind}"] = [
                    f"{hf_prefix}{i}.self_attn.{x}_proj.{kind}" for x in ("q", "k", "v")
                ]
    expected = set(names) | {name for group in packed.values() for name in group}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"Hugging Face CLIP state dict does not match: missing keys {missing}, unexpected keys {unexpected}"
        )
    out = {ours: state[hf].t().contiguous() if hf in _HF_TRANSPOSED else state[hf] for hf, ours in names.items()}
    for ours, (q, k, v) in packed.items():
        out[ours] = torch.cat([state[q], state[k], state[v]], dim=0)  # (3 width, width) or (3 width,)
    return out
# ANCHOR_END: hugging_face


# ---------------------------------------------------------------------------------------------
# TorchScript archives
# ---------------------------------------------------------------------------------------------

# ANCHOR: torchscript
# Storage classes named in a TorchScript archive's data.pkl; each only tells a dtype.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "BoolStorage": torch.bool, "ByteStorage": torch.uint8,
}


class _ScriptObject:
    """Stands in for every ``__torch__.*`` class: a bag of attributes, no code."""


def _rebuild_tensor(storage: Tensor, offset: int, size, stride, *_unused) -> Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()  # (*size)


class _ArchiveUnpickler(pickle.Unpickler):
    """Reads data.pkl of a TorchScript archive; any global outside a short list is refused."""

    def __init__(self, file, archive: zipfile.ZipFile, root: str) -> None:
        super().__init__(file)
        self.archive, self.root = archive, root

    def find_class(self, module: str, name: str):
        if module.startswith("__torch__."):
            return _ScriptObject  # the module's class: we keep its attributes, never its code
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]  # a storage type only says the dtype
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return dict  # backward hooks: always empty in a saved model
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} from a TorchScript archive")

    def persistent_load(self, pid) -> Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, dtype, key, _location, numel = pid  # ("storage", torch.float32, "0", "cpu", 4928)
        if not isinstance(dtype, torch.dtype):
            raise pickle.UnpicklingError(f"unexpected storage type in persistent id {pid!r}")
        data = bytearray(self.archive.read(f"{self.root}/data/{key}"))
        return torch.frombuffer(data, dtype=dtype, count=numel) if numel else torch.empty(0, dtype=dtype)


def _flatten(obj: _ScriptObject, prefix: str, out: dict[str, Tensor], depth: int = 0) -> None:
    """Dotted names for every tensor attribute in the module tree, as state_dict() would give."""
    if depth > 64:  # a module tree is shallow; a cycle in a crafted file is not
        raise ValueError("TorchScript module tree is more than 64 levels deep (a cycle?)")
    for name, value in vars(obj).items():
        if isinstance(value, Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _flatten(value, f"{prefix}{name}.", out, depth + 1)


# Tensors a scripted CLIP carries that are not weights: the causal mask, and sizes OpenAI kept as tensors.
_NOT_WEIGHTS = ("attn_mask", "input_resolution", "context_length", "vocab_size")


def read_torchscript_state_dict(path: Path) -> dict[str, Tensor]:
    """The weights of a TorchScript archive (OpenAI's released .pt files), without running its code.

    The archive's data.pkl describes the module tree; a restricted unpickler
    rebuilds only tensors and plain attribute bags from it, so neither the
    archive's TorchScript code nor any pickled Python call is executed.
    """
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(names) != 1:
            raise ValueError(f"{path}: expected one <root>/data.pkl in the archive, found {names}")
        root = names[0].split("/")[0]
        with archive.open(names[0]) as f:
            tree = _ArchiveUnpickler(f, archive, root).load()
    if not isinstance(tree, _ScriptObject):
        raise ValueError(f"{path}: data.pkl holds a {type(tree).__name__}, not a scripted module")
    state: dict[str, Tensor] = {}
    _flatten(tree, "", state)
    return {k: v for k, v in state.items() if k.split(".")[-1] not in _NOT_WEIGHTS}
# ANCHOR_END: torchscript


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive is a zip holding the model's Python code (``code/``) and constants."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if _is_torchscript(path):
        try:
            return read_torchscript_state_dict(path)
        except pickle.UnpicklingError as error:
            raise ValueError(f"could not read the TorchScript archive {path}: {error}") from error
    # weights_only=True: the unpickler builds tensors and plain containers only, never
    # calls an arbitrary function named in the file, so a malicious pickle is refused.
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError (or RuntimeError) on forbidden globals
        raise ValueError(f"could not read {path} with weights_only=True: {error}") from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]  # an open_clip training checkpoint: {"epoch", "state_dict", ...}
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state dict")
    return dict(loaded)


# ANCHOR: load_clip
def load_clip(
    path_or_state_dict: str | Path | Mapping[str, Tensor],
    *,
    quick_gelu: bool = True,
    device: str | torch.device = "cpu",
) -> CLIP:
    """A `CLIP` with the weights of a state dict, or of a .safetensors / .pt / .bin file.

    A .pt file may be a torch.save'd state dict (read with weights_only=True) or
    a TorchScript archive such as OpenAI's released models (read by
    `read_torchscript_state_dict`); neither path runs code from the file.
    Half-precision weights are copied into the model's float32 parameters.

    quick_gelu: True for OpenAI's models, False for open_clip's LAION-trained
    ones; the weights cannot say which, and the wrong choice gives wrong outputs.
    A Hugging Face transformers.CLIPModel state dict (or its model.safetensors)
    is renamed by `from_hugging_face` first.
    The architecture is inferred by `config_from_state_dict`. Keys must match
    exactly (after removing a ``module.`` prefix left by DistributedDataParallel):
    otherwise ValueError names the missing and unexpected keys.
    """
    if isinstance(path_or_state_dict, Mapping):
        state_dict = dict(path_or_state_dict)
    elif isinstance(path_or_state_dict, (str, Path)):
        state_dict = _read_state_dict(Path(path_or_state_dict))
    else:
        raise ValueError(f"expected a path or a state dict, got {type(path_or_state_dict).__name__}")
    if state_dict and all(key.startswith("module.") for key in state_dict):
        state_dict = {key[len("module."):]: value for key, value in state_dict.items()}
    if is_hugging_face(state_dict):
        state_dict = from_hugging_face(state_dict)

    model = CLIP(config_from_state_dict(state_dict, quick_gelu=quick_gelu))
    ours, theirs = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match CLIP: missing keys {missing}, unexpected keys {unexpected}"
        )
    model.load_state_dict(state_dict, strict=True)  # shapes checked here too
    return model.to(device).eval()
# ANCHOR_END: load_clip


# ---------------------------------------------------------------------------------------------
# Whisper
# ---------------------------------------------------------------------------------------------

# ANCHOR: load_whisper
def load_whisper(
    path_or_checkpoint: str | Path | Mapping[str, object], *, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A `tiny_mm.whisper.Whisper` from an openai-whisper checkpoint, or the path of its .pt file.

    The checkpoint is a dict ``{"dims": {n_mels: ..., ..., n_text_layer: ...},
    "model_state_dict": {...}}`` (openai-whisper's released files hold these two
    keys, the weights in float16). A file is read with ``weights_only=True``:
    tensors, numbers and plain containers only, so a pickle that names a
    function is refused (ValueError) and never run. Keys must match exactly:
    otherwise ValueError names the missing and unexpected ones. Half-precision
    weights are copied into the model's float32 parameters.
    """
    from tiny_mm.whisper import Whisper, WhisperDims  # here, not at the top: CLIP users need no Whisper

    if isinstance(path_or_checkpoint, (str, Path)):
        path = Path(path_or_checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # forbidden globals raise UnpicklingError (or RuntimeError)
            raise ValueError(f"could not read {path} with weights_only=True: {error}") from error
    elif isinstance(path_or_checkpoint, Mapping):
        checkpoint = path_or_checkpoint
    else:
        raise ValueError(f"expected a path or a checkpoint dict, got {type(path_or_checkpoint).__name__}")
    if not isinstance(checkpoint, Mapping) or not {"dims", "model_state_dict"} <= set(checkpoint):
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"a Whisper checkpoint is a dict with 'dims' and 'model_state_dict', got {keys}")
    state_dict = checkpoint["model_state_dict"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"'model_state_dict' must be a mapping, got {type(state_dict).__name__}")

    model = Whisper(WhisperDims.from_mapping(checkpoint["dims"]))
    ours, theirs = set(model.state_dict()), set(state_dict)
    missing, unexpected = sorted(ours - theirs), sorted(theirs - ours)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match Whisper: missing keys {missing}, unexpected keys {unexpected}"
        )
    model.load_state_dict(state_dict, strict=True)  # shapes checked here; float16 -> float32 by copy_
    return model.to(device).eval()
# ANCHOR_END: load_whisper
