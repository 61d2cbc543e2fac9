"""SwinIR-light against an independent oracle, and checkpoint loading in the official key layout.

The oracle computes every (shifted) window attention as one global attention over all tokens
whose logits are -inf between tokens of different windows and -100 between tokens of different
shifted regions (the official mask value), with the relative-position bias indexed from token
coordinates. It shares no code with quantlab.swinir, so agreement checks the window partition,
the cyclic shift, the mask, the bias indexing, padding and cropping together.
"""
import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import quantlab
from quantlab.checkpoints import CheckpointError, infer_config, load_model, save_model, to_official_keys
from quantlab import kernels, swinir
from quantlab.swinir import RGB_MEAN, SwinIR, SwinIRConfig, relative_position_index, shifted_window_mask


def realistic_official_state(config: SwinIRConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of trained-model scale in the official key layout, with the stored buffers."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in SwinIR(config).state_dict().items():
        if key.endswith("relative_position_bias_table"):
            new = torch.randn(value.shape, generator=gen) * 1.5
        elif "norm" in key and key.endswith("weight"):
            new = 1 + 0.3 * torch.randn(value.shape, generator=gen)
        elif key.endswith("bias"):
            new = 0.1 * torch.randn(value.shape, generator=gen)
        else:
            fan_in = value[0].numel()
            new = torch.randn(value.shape, generator=gen) / math.sqrt(fan_in)
        state[key] = new
    state = to_official_keys(state)
    window = config.window_size
    for i, depth in enumerate(config.depths):
        for j in range(depth):
            prefix = f"layers.{i}.residual_group.blocks.{j}"
            state[f"{prefix}.attn.relative_position_index"] = relative_position_index(window)
            if j % 2:
                state[f"{prefix}.attn_mask"] = shifted_window_mask(64, 64, window, window // 2)
    return state


def layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps=1e-5)


def linear(x, state, prefix):
    return F.linear(x, state[prefix + ".weight"], state[prefix + ".bias"])


def conv(x, state, prefix):
    return F.conv2d(x, state[prefix + ".weight"], state[prefix + ".bias"], padding=1)


def oracle_block(x, state, prefix, h, w, window, heads, shift):
    """One STL on (B, H*W, C) tokens with global masked attention (float64)."""
    b, n, c = x.shape
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = (rows.flatten() - shift) % h, (cols.flatten() - shift) % w  # shifted-frame coordinates
    window_id = (rows // window) * (w // window) + cols // window
    band = lambda v, size: (v >= size - window).long() + (v >= size - shift).long() if shift else 0 * v
    region = 3 * band(rows, h) + band(cols, w)
    pr, pc = rows % window, cols % window
    rel = (pr[:, None] - pr[None] + window - 1) * (2 * window - 1) + (pc[:, None] - pc[None] + window - 1)
    bias = state[prefix + ".attn.relative_position_bias_table"][rel].permute(2, 0, 1)  # heads, N, N
    mask = torch.where(region[:, None] != region[None], -100.0, 0.0).double()
    mask = mask.masked_fill(window_id[:, None] != window_id[None], float("-inf"))

    y = layer_norm(x, state, prefix + ".norm1")
    q, k, v = linear(y, state, prefix + ".attn.qkv").view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    logits = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1) + bias + mask
    attn = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
    x = x + linear(attn, state, prefix + ".attn.proj")
    y = linear(F.gelu(linear(layer_norm(x, state, prefix + ".norm2"), state, prefix + ".mlp.fc1")), state,
               prefix + ".mlp.fc2")
    return x + y


def oracle_forward(state, x, config: SwinIRConfig):
    state = {k: v.double() for k, v in state.items()}
    x = x.double()
    h0, w0 = x.shape[2:]
    win = config.window_size
    x = F.pad(x, (0, -w0 % win, 0, -h0 % win), mode="reflect")
    mean = torch.tensor(RGB_MEAN).double().view(1, 3, 1, 1)  # float32 constants, as the official model
    feat = conv(x - mean, state, "conv_first")
    b, c, h, w = feat.shape
    tokens = layer_norm(feat.flatten(2).transpose(1, 2), state, "patch_embed.norm")
    for i, depth in enumerate(config.depths):
        start = tokens
        for j in range(depth):
            prefix = f"layers.{i}.residual_group.blocks.{j}"
            tokens = oracle_block(tokens, state, prefix, h, w, win, config.num_heads[i], (j % 2) * win // 2)
        image = conv(tokens.transpose(1, 2).reshape(b, c, h, w), state, f"layers.{i}.conv")
        tokens = start + image.flatten(2).transpose(1, 2)
    body = layer_norm(tokens, state, "norm").transpose(1, 2).reshape(b, c, h, w)
    out = F.pixel_shuffle(conv(conv(body, state, "conv_after_body") + feat, state, "upsample.0"), config.scale)
    return (out + mean)[:, :, : h0 * config.scale, : w0 * config.scale]


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    config = SwinIRConfig(scale=2)
    state = realistic_official_state(config)
    path = tmp_path_factory.mktemp("ckpt") / "002_lightweightSR_DIV2K_s64w8_SwinIR-S_x2.pth"
    torch.save({"params": state}, path)
    return path, state, config


@pytest.mark.parametrize("size", [(16, 24), (13, 21)], ids=["window-multiple", "padded"])
def test_matches_oracle_on_official_checkpoint(official_checkpoint, size):
    path, state, config = official_checkpoint
    model = load_model(path)
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1))
    expected = oracle_forward(state, x, config)
    with torch.no_grad():
        out32 = model(x)
        out64 = model.double()(x.double())
    assert out32.shape == (2, 3, 2 * size[0], 2 * size[1])
    assert expected.abs().max() > 0.5  # the weights are not zero-ish
    assert (out32.double() - expected).abs().max() <= 1e-5
    assert (out64 - expected).abs().max() <= 1e-9


def test_hooked_matmuls_take_the_explicit_path_and_agree(official_checkpoint):
    """A hook on the attention matmuls disables the fused kernel; both paths match the oracle."""
    path, state, config = official_checkpoint
    model = load_model(path)
    calls = []
    for layer in model.layers:
        for block in layer.blocks:
            block.attn.matmul_av.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    x = torch.rand(2, 3, 13, 21, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x)
    assert len(calls) == sum(config.depths)
    assert calls[0] == (2 * 2 * 3, config.num_heads[0], 64, 64)  # (B * nW, heads, N, N) softmax maps
    assert (out.double() - oracle_forward(state, x, config)).abs().max() <= 1e-5


@pytest.mark.parametrize("path", ["fused", "explicit", "auto"])
def test_every_inference_attention_path_matches_the_oracle(official_checkpoint, monkeypatch, tmp_path, path):
    """Both FP inference paths (pinned with QUANTLAB_ATTENTION) and the measured choice agree with the oracle
    to 1e-5, on a batch of patches and on one image of more windows than a patch. The measured choice is made
    afresh in a cache dir of its own (the machine's stored choices are neither read nor written)."""
    path_file, state, config = official_checkpoint
    monkeypatch.setenv(swinir.ATTENTION_ENV, path)
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(swinir, "_chosen_paths", {})
    model = load_model(path_file)
    for shape in [(3, 3, 16, 16), (1, 3, 40, 48)]:
        x = torch.rand(*shape, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            assert (model(x).double() - oracle_forward(state, x, config)).abs().max() <= 1e-5


def test_attention_bias_is_contiguous_with_and_without_mask():
    """The bias the softmax rows read is laid out heads-major (unit stride along the keys), with the shift
    mask added or not, and holds the table's entries at the relative-position index."""
    attn = swinir.WindowAttention(dim=12, num_heads=3, window=4)
    n = 16
    mask = shifted_window_mask(8, 8, 4, 2)
    for bias in (attn.attention_bias(n), swinir.masked_bias(attn.attention_bias(n), mask)):
        assert bias.is_contiguous() and bias.shape[1:] == (3, n, n)
    index = relative_position_index(4)
    expected = attn.relative_position_bias_table[index.reshape(-1)].reshape(n, n, 3).permute(2, 0, 1)
    assert torch.equal(attn.attention_bias(n)[0], expected)
    assert torch.equal(swinir.masked_bias(attn.attention_bias(n), mask), mask[:, None] + expected)


@pytest.fixture
def timed_paths(monkeypatch, tmp_path):
    """A machine that has measured nothing (its own cache dir, no pinned path, no choices in this process):
    (calls, path), where ``path(name, seconds, value)`` is a path that records its name in ``calls``, takes
    ``seconds`` and returns ``value``."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    monkeypatch.delenv(swinir.ATTENTION_ENV, raising=False)
    monkeypatch.setattr(swinir, "_chosen_paths", {})
    calls = []

    def path(name: str, seconds: float, value: float):
        def run():
            calls.append(name)
            time.sleep(seconds)
            return torch.tensor(float(value))
        return run
    return calls, path


def test_attention_path_is_measured_once_per_key(monkeypatch, timed_paths):
    """The first call for a key runs every path (timed) and returns the faster one's output; later calls
    run only that path; a pinned path runs alone; a wrong pin names the variable and the choices."""
    calls, path = timed_paths
    paths = {"slow": path("slow", 0.05, len("slow")), "quick": path("quick", 0.0, len("quick"))}
    assert swinir.attention_path(("k",), paths).item() == len("quick")
    assert calls == ["slow", "quick"]  # one round: the slower took far more than CLOSE_RACE times as long
    assert swinir.attention_path(("k",), paths).item() == len("quick") and calls[2:] == ["quick"]
    assert swinir.chosen_attention_paths() == {("k",): "quick"}
    monkeypatch.setenv(swinir.ATTENTION_ENV, "slow")
    assert swinir.attention_path(("k",), paths).item() == len("slow") and calls[3:] == ["slow"]
    monkeypatch.setenv(swinir.ATTENTION_ENV, "fast")
    with pytest.raises(ValueError, match="QUANTLAB_ATTENTION must be 'auto' or one of"):
        swinir.attention_path(("k",), paths)


def test_a_later_process_on_the_machine_keeps_the_stored_choice(monkeypatch, tmp_path, timed_paths):
    """The choice goes to the cache dir; a process that has not measured (its choices empty) runs the
    stored path without timing, even when another would now win; another thread count measures anew."""
    calls, path = timed_paths
    assert swinir.attention_path(("k",), {"a": path("a", 0.05, 0.05), "b": path("b", 0.0, 0.0)}).item() == 0.0
    stored = json.loads((tmp_path / swinir.ATTENTION_CHOICES).read_text())
    assert list(stored.values()) == ["b"]
    monkeypatch.setattr(swinir, "_chosen_paths", {})
    paths = {"a": path("a", 0.0, 0.0), "b": path("b", 0.05, 0.05)}  # "b" is now the slow one
    calls.clear()
    assert swinir.attention_path(("k",), paths).item() > 0 and calls == ["b"]
    threads = torch.get_num_threads()
    monkeypatch.setattr(swinir, "_chosen_paths", {})
    try:
        torch.set_num_threads(threads + 1)
        calls.clear()
        assert swinir.attention_path(("k",), paths).item() == 0.0 and calls == ["a", "b"]
    finally:
        torch.set_num_threads(threads)
    assert len(json.loads((tmp_path / swinir.ATTENTION_CHOICES).read_text())) == 2


def test_a_new_kernel_build_measures_again(monkeypatch, timed_paths):
    """A stored choice belongs to the kernel build it was measured with: a changed kernel (another build) races the
    paths again, since it may now win or lose."""
    calls, path = timed_paths
    paths = {"a": path("a", 0.05, 0.05), "b": path("b", 0.0, 0.0)}
    monkeypatch.setattr(kernels, "build_id", lambda: "kernels-0000")
    assert swinir.attention_path(("k",), paths).item() == 0.0 and calls == ["a", "b"]
    monkeypatch.setattr(swinir, "_chosen_paths", {})
    calls.clear()
    assert swinir.attention_path(("k",), paths).item() == 0.0 and calls == ["b"]  # the same build: stored
    monkeypatch.setattr(swinir, "_chosen_paths", {})
    monkeypatch.setattr(kernels, "build_id", lambda: "kernels-1111")
    calls.clear()
    assert swinir.attention_path(("k",), paths).item() == 0.0 and calls == ["a", "b"]


MEASURING_PROCESS = """
import pathlib, sys, time, torch
from quantlab import swinir
torch.set_num_threads(1)
def slow():
    pathlib.Path(sys.argv[1]).touch()  # inside the lock: the test's process may start now
    time.sleep(1.5)
    return torch.tensor(1.0)
swinir.attention_path(("k",), {"a": slow, "b": lambda: torch.tensor(0.0)})
"""


def test_a_process_meeting_a_key_being_measured_waits_and_takes_that_choice(tmp_path, timed_paths):
    """Two processes meeting a new key at once: the second waits on the lock while the first times the paths,
    then runs the first's choice ("b") without timing, though by its own timing "a" would win."""
    calls, path = timed_paths
    ready = tmp_path / "measuring"
    other = subprocess.Popen([sys.executable, "-c", MEASURING_PROCESS, str(ready)], env=os.environ.copy())
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and other.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), "the measuring process did not start"
        paths = {"a": path("a", 0.0, 1.0), "b": path("b", 0.05, 0.0)}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert swinir.attention_path(("k",), paths).item() == 0.0
        finally:
            torch.set_num_threads(threads)
        assert calls == ["b"]
    finally:
        assert other.wait(timeout=60) == 0


def test_oracle_detects_a_wrong_shift(official_checkpoint):
    """The oracle test can fail: a model whose shifted blocks do not shift disagrees."""
    path, state, config = official_checkpoint
    model = load_model(path)
    for layer in model.layers:
        for block in layer.blocks:
            block.shift = 0
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x).double() - oracle_forward(state, x, config)).abs().max() > 1e-3


@pytest.mark.parametrize("wrap", [
    lambda state: {"state_dict": {f"module.{k}": v for k, v in state.items()}},  # DataParallel-saved training state
    lambda state: {"model": state},
    lambda state: dict(state),  # a bare state dict
], ids=["state_dict+module.", "model", "bare"])
def test_kair_and_basicsr_layouts_load_the_same_model(tmp_path, official_checkpoint, wrap):
    path, state, _ = official_checkpoint
    torch.save(wrap(state), tmp_path / "variant.pth")
    variant, official = load_model(tmp_path / "variant.pth"), load_model(path)
    for (name, value), (_, expected) in zip(variant.state_dict().items(), official.state_dict().items()):
        assert torch.equal(value, expected), name


def test_config_inferred_from_weights(tmp_path):
    config = SwinIRConfig(scale=3, embed_dim=24, depths=(2, 3), num_heads=(3, 4), window_size=4, mlp_ratio=1.5)
    path = tmp_path / "small.pth"
    torch.save(realistic_official_state(config), path)
    assert load_model(path).config == config
    assert infer_config(quantlab.checkpoints.from_official_keys(
        realistic_official_state(SwinIRConfig(scale=4)))).scale == 4


def test_params_ema_preferred_and_safetensors_round_trip(tmp_path, official_checkpoint):
    _, state, _ = official_checkpoint
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    torch.save({"params": zeros, "params_ema": state}, tmp_path / "ema.pth")
    model = load_model(tmp_path / "ema.pth")
    assert torch.equal(model.conv_first.weight, state["conv_first.weight"])
    save_model(model, tmp_path / "m.safetensors")
    again = load_model(tmp_path / "m.safetensors")
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("layers.0.residual_group.blocks.0.mlp.fc2.weight"), "missing keys"),
        (lambda s: s.update({"layers.0.extra.weight": torch.zeros(3)}), "unexpected keys ['layers.0.extra.weight']"),
        (lambda s: s.update({"layers.0.residual_group.blocks.1.attn.proj.weight": torch.zeros(60, 61)}), "(60, 61)"),
        (lambda s: s.update({"conv_before_upsample.0.weight": torch.zeros(64, 60, 3, 3)}), "upsampler"),
        (lambda s: s.pop("layers.0.residual_group.blocks.0.mlp.fc1.weight"), "mlp.fc1.weight"),
        (lambda s: s.pop("layers.3.residual_group.blocks.0.attn.relative_position_bias_table"), "layers.3.blocks.0"),
        (lambda s: [s.pop(k) for k in list(s) if k.startswith("layers.1.residual_group.blocks.2.")], "more)"),
    ],
    ids=["missing", "extra", "mis-shaped", "classical-swinir", "no-fc1", "no-bias-table", "many-missing"],
)
def test_wrong_checkpoints_name_the_problem(tmp_path, official_checkpoint, edit, message):
    state = dict(official_checkpoint[1])
    edit(state)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "bad.pth")
    assert message in str(err.value)


def test_missing_file_and_non_tensor_pickle_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load_model(tmp_path / "nope.pth")
    (tmp_path / "evil.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_model(tmp_path / "evil.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(tmp_path / "broken.safetensors")


def test_quantizable_submodules_are_named():
    names = dict(SwinIR().named_modules())
    for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "attn.matmul_qk", "attn.matmul_av"):
        assert sum(name.endswith(leaf) for name in names) == 24


def test_unshipped_embedded_model_is_explained(monkeypatch, tmp_path):
    monkeypatch.setitem(quantlab.checkpoints.EMBEDDED_MODELS, "default-x2", tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="not trained yet"):
        load_model("default-x2")


def test_single_channel_model_runs_without_rgb_mean():
    model = SwinIR(SwinIRConfig(in_chans=1, embed_dim=12, depths=(2,), num_heads=(2,), window_size=4)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 8, 8)).shape == (1, 1, 16, 16)
    assert not model.mean.any()
