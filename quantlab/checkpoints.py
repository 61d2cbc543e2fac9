"""Loading and saving SwinIR-light weights: official checkpoints, safetensors and the embedded models.

Accepted files: the official ``002_lightweightSR_DIV2K_s64w8_SwinIR-S_x{2,3,4}.pth`` (a dict with
``params`` or ``params_ema``), a bare state dict, KAIR/BasicSR key names, and ``.safetensors``.
Hyper-parameters are inferred from the weight shapes. Loading is strict: a file that is not
SwinIR-light fails with an error naming the offending keys and shapes.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_path
from .runtime import pick_device
from .swinir import SwinIR, SwinIRConfig

WEIGHTS_DIR = Path(__file__).parent / "weights"
EMBEDDED_MODELS = {f"default-x{s}": WEIGHTS_DIR / f"swinir_light_x{s}.safetensors" for s in (2, 3, 4)}
OFFICIAL_NAME = re.compile(r"002_lightweightSR_DIV2K_s64w8_SwinIR-S_x[234]\.pth")  # the released SwinIR-light files
WEIGHTS_ORIGINS = {  # what a results caption says of the weights of each origin (:func:`weights_origin`)
    "embedded": "quantlab's embedded weights, trained here, not the official SwinIR-light weights",
    "official": "the official SwinIR-light weights, judged by the file name",
    "checkpoint": "a user checkpoint, not named as the official SwinIR-light weights",
}
# Buffers stored in official files; quantlab recomputes them for the actual input size.
RECOMPUTED_BUFFERS = ("attn_mask", "relative_position_index")


class CheckpointError(ValueError):
    """A weights file that cannot be loaded as SwinIR-light."""


ZIP_MAGIC, PICKLE_PROTOCOL = b"PK\x03\x04", b"\x80"  # torch.save's zip format; legacy torch.save / pickle.dump


def file_format(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` (zip or pickle) or ``"unknown"``, from the first bytes of ``path``."""
    with path.open("rb") as file:
        head = file.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 30):
        return "safetensors"  # an 8-byte header length, then the JSON header
    if head.startswith(ZIP_MAGIC) or (head[:1] == PICKLE_PROTOCOL and head[1:2] in b"\x02\x03\x04\x05"):
        return "torch"
    return "unknown"


def load_weights_only(path: str | Path) -> object:
    """The content of a torch file (``torch.save``), loaded with ``weights_only=True`` so pickled code never
    runs. A missing file is a FileNotFoundError; an empty, truncated or damaged file, or one carrying
    pickled Python objects, a CheckpointError naming the file (never suggesting ``weights_only=False``).
    For every torch file quantlab reads: checkpoints, quantized-model files, training and DQC states."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not finish; fetch it again")
    if file_format(path) != "torch":
        raise CheckpointError(f"{path} is not a readable torch checkpoint: it is not a torch file (zip or pickle)")
    try:
        # a file object: torch.load would hand a path ending in .safetensors to safetensors
        with path.open("rb") as file, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols are noise here
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message would suggest weights_only=False: never do that
        raise CheckpointError(
            f"{path} is not a weights-only checkpoint: it holds pickled Python objects besides tensors, which "
            "quantlab does not load because unpickling them can run arbitrary code. Save the weights alone "
            "(torch.save(model.state_dict(), ...) or safetensors) and pass that file"
        ) from None
    except Exception as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{path} is not a readable torch checkpoint: it is truncated or damaged ({reason}); "
                              "fetch or copy it again") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.safetensors`` file, unwrapped from ``params_ema``/``params``/``state_dict``.

    The format is told from the file's first bytes (a safetensors file named ``.pth`` loads); torch files
    go through :func:`load_weights_only`. Empty, truncated and damaged files are CheckpointErrors naming
    the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no weights file at {path}" + (" (it is a folder)" if path.is_dir() else "") + ". Pass the path of a "
            f"SwinIR-light checkpoint (e.g. 002_lightweightSR_DIV2K_s64w8_SwinIR-S_x2.pth) or one of "
            f"{sorted(EMBEDDED_MODELS)}."
        )
    fmt = file_format(path) if path.stat().st_size else "torch"  # load_weights_only explains an empty file
    if fmt == "unknown":
        kind = "safetensors file" if path.suffix == ".safetensors" else "torch checkpoint"
        raise CheckpointError(f"{path} is not a readable {kind}: it is neither a torch file (zip or pickle) nor "
                              "a safetensors file; pass a SwinIR-light checkpoint (.pth or .safetensors)")
    if fmt == "torch":
        state = load_weights_only(path)
        format_tag = str(state.get("format", "")) if isinstance(state, dict) else ""
    else:
        try:  # one pass over the file: its metadata (format "pt" in many checkpoints), then its tensors
            with safe_open(str(path), framework="pt") as file:
                format_tag = (file.metadata() or {}).get("format", "")
                state = {} if format_tag.startswith("quantlab-") else {key: file.get_tensor(key) for key in file.keys()}
        except Exception as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise CheckpointError(f"{path} is not a readable safetensors file: it is truncated or damaged ({reason}); "
                                  "fetch or copy it again") from None
    if format_tag.startswith("quantlab-"):
        raise CheckpointError(f"{path} is a {format_tag} file, not FP weights: give a quantized-model file to "
                              "'quantlab eval --quantized' (a packed one to quantlab.cost.load_packed), with the FP "
                              "weights it was made from as --model")
    for wrapper in ("params_ema", "params", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def from_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official/KAIR/BasicSR key names -> quantlab names; drops the recomputed buffers."""
    renamed = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key.rsplit(".", 1)[-1] in RECOMPUTED_BUFFERS:
            continue
        key = key.replace(".residual_group.", ".").replace("patch_embed.norm.", "patch_norm.")
        renamed[key] = value
    return renamed


def to_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """quantlab names -> official SwinIR key names (parameters only)."""
    official = {}
    for key, value in state.items():
        key = re.sub(r"^layers\.(\d+)\.blocks\.", r"layers.\1.residual_group.blocks.", key)
        official[key.replace("patch_norm.", "patch_embed.norm.")] = value
    return official


def infer_config(state: dict[str, torch.Tensor]) -> SwinIRConfig:
    """SwinIR-light hyper-parameters from weight shapes (quantlab key names)."""
    n_layers = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("layers.")), default=-1)
    required = ["conv_first.weight", "upsample.0.weight", "layers.0.blocks.0.mlp.fc1.weight"]
    required += [f"layers.{i}.blocks.0.attn.relative_position_bias_table" for i in range(max(n_layers, 1))]
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"not a SwinIR-light state dict: missing {missing}")
    if any(k.startswith(("conv_before_upsample", "conv_up1", "conv_hr")) for k in state):
        raise CheckpointError("not SwinIR-light: this checkpoint has a 'pixelshuffle'/'nearest+conv' upsampler")
    embed_dim, in_chans = state["conv_first.weight"].shape[:2]
    depths = tuple(
        1 + max(int(k.split(".")[3]) for k in state if k.startswith(f"layers.{i}.blocks.")) for i in range(n_layers)
    )
    heads = tuple(state[f"layers.{i}.blocks.0.attn.relative_position_bias_table"].shape[1] for i in range(n_layers))
    table_rows = state["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0]
    window = (math.isqrt(table_rows) + 1) // 2
    hidden = state["layers.0.blocks.0.mlp.fc1.weight"].shape[0]
    scale = math.isqrt(state["upsample.0.weight"].shape[0] // in_chans)
    return SwinIRConfig(
        scale=scale, embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=window,
        mlp_ratio=hidden / embed_dim, in_chans=in_chans,
    )


def check_finite_weights(state: dict[str, torch.Tensor], source: str = "state dict") -> None:
    """CheckpointError naming the tensors of ``state`` that hold NaN or inf."""
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""
        raise CheckpointError(f"{source} has NaN or inf weights in {bad[:8]}{more}: the file is damaged or its "
                              "training diverged; use another checkpoint")


def model_from_state_dict(state: dict[str, torch.Tensor], source: str = "state dict") -> SwinIR:
    """Build a SwinIR with the inferred config and load ``state`` strictly."""
    state = from_official_keys(state)
    model = SwinIR(infer_config(state))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{label} {keys[:8]}" + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "") for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{source} is not a SwinIR-light checkpoint: " + "; ".join(problems))
    if model.config.in_chans != 3:
        raise CheckpointError(f"{source} is a {model.config.in_chans}-channel model (conv_first takes "
                              f"{model.config.in_chans} input channels); quantlab scores and calibrates RGB models "
                              "only: pass a 3-channel SwinIR-light checkpoint")
    check_finite_weights(state, source)
    model.load_state_dict(state, strict=True)
    return model


def load_model(source: str | Path, device: str | torch.device | None = "cpu") -> SwinIR:
    """SwinIR-light in eval mode from a weights path or an embedded name (``default-x2/x3/x4``).

    ``device=None`` picks CUDA when available.
    """
    if str(source) in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[str(source)]
        if not path.is_file():
            raise FileNotFoundError(
                f"the embedded model {source!r} is not trained yet ({path.name} is not shipped in this version); "
                "pass the path of an official SwinIR-light checkpoint instead"
            )
    else:
        path = Path(source)
    model = model_from_state_dict(read_state_dict(path), source=str(path))
    return model.eval().to(pick_device(device))


def weights_origin(source: str | Path) -> str:
    """Where the weights of the model spec ``source`` come from: ``embedded`` (a ``default-x<s>`` name),
    ``official`` (a file named as the released SwinIR-light checkpoints) or ``checkpoint`` (any other file)."""
    if str(source) in EMBEDDED_MODELS:
        return "embedded"
    return "official" if OFFICIAL_NAME.fullmatch(Path(source).name) else "checkpoint"


def as_model(model: torch.nn.Module | str | Path) -> torch.nn.Module:
    """``model`` in eval mode, or the model of a weights path / embedded name on the picked device
    (CUDA when available)."""
    return load_model(model, device=None) if isinstance(model, (str, Path)) else model.eval()


def save_model(model: SwinIR, path: str | Path) -> None:
    """Save parameters only, in the official key layout, as ``.safetensors`` (atomic write)."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(to_official_keys(state), str(tmp), metadata={"scale": str(model.scale)})


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the FP model's parameters (names, shapes and float32 bytes)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
