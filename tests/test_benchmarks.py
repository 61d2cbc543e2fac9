"""The benchmark scripts stay runnable: each imports what it needs from quantlab and parses its arguments."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quantlab.quant import QuantConfig, QuantWindowAttention, quantize
from quantlab.swinir import SwinIR, SwinIRConfig

BENCHMARK_DIR = Path(__file__).parent.parent / "benchmarks"
BENCHMARKS = sorted(BENCHMARK_DIR.glob("*.py"))


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_imports_and_prints_its_usage(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def load_quant_speed():
    """benchmarks/quant_speed.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("quant_speed", BENCHMARK_DIR / "quant_speed.py")
    quant_speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quant_speed)
    return quant_speed


def test_interleaved_forwards_give_each_net_every_image_in_turns_per_round():
    quant_speed = load_quant_speed()
    calls = []
    nets = {}
    for name in ("FP", "fake-quantized"):
        torch.manual_seed(0)
        net = SwinIR(SwinIRConfig(scale=2, embed_dim=12, depths=(1,), num_heads=(2,))).eval()
        net.register_forward_hook(lambda module, inputs, output, name=name: calls.append(name))
        nets[name] = net
    seconds = quant_speed.interleaved_forwards(nets, "Set5", rounds=2)
    assert [len(times) for times in seconds.values()] == [2, 2] and all(t > 0 for ts in seconds.values() for t in ts)
    timed = calls[10:]  # after the warm-up's five images per net
    assert len(timed) == 20
    pairs = [tuple(timed[i:i + 2]) for i in range(0, 20, 2)]
    assert all(sorted(pair) == ["FP", "fake-quantized"] for pair in pairs)  # both nets on every image
    assert pairs[0] != pairs[1] and pairs[0] != pairs[5]  # the first of each pair alternates, per image and per round


def test_attention_kernel_rounds_time_fp_and_the_models_first_attention_quantizers(monkeypatch):
    quant_speed = load_quant_speed()
    model = SwinIR(SwinIRConfig(scale=2, embed_dim=12, depths=(2,), num_heads=(2,))).eval()
    qmodel = quantize(model, QuantConfig(bits=4))
    first = next(module for module in qmodel.modules() if isinstance(module, QuantWindowAttention))
    first.matmul_av.attn.set_bounds(0.0, 0.5)
    first.matmul_av.v.mode = "off"
    calls = []

    def recording(q, k, v, bias, scale, quantizers=None, *args, **kwargs):
        calls.append(quantizers)
        return q

    monkeypatch.setattr(quant_speed.kernels, "window_attention", recording)
    seconds = quant_speed.attention_kernel_rounds(qmodel, rounds=2, windows=4)
    assert [len(times) for times in seconds.values()] == [2, 2]
    expected = tuple(quantizer.kernel_spec() for quantizer in (first.matmul_qk.q, first.matmul_qk.k,
                                                               first.matmul_av.attn, first.matmul_av.v))
    assert expected[2] == pytest.approx((0.0, 0.5 / 15, 15)) and expected[3] is None  # the first attention's own
    fp_first, quantized_first = [None] * 3 + [expected] * 3, [expected] * 3 + [None] * 3
    assert calls == fp_first + quantized_first + fp_first  # a warm-up round, then two, the first turn alternating
