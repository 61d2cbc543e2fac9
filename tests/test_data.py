"""Benchmark discovery, LR generation and caching, size checks, and calibration patches."""
import numpy as np
import pytest
import torch
from PIL import Image

from quantlab.data import Benchmark, PatchSampler, calibration_patches, data_root, dihedral, list_images, read_image


@pytest.fixture
def tiny_benchmark(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_DATA", str(tmp_path))
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    hr = tmp_path / "benchmark" / "Tiny" / "HR"
    hr.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (26, 35, 3), dtype=np.uint8)).save(hr / "a.png")
    Image.fromarray(rng.integers(0, 256, (24, 24), dtype=np.uint8)).save(hr / "gray.png")
    return tmp_path


def test_missing_lr_is_generated_cached_and_hr_cropped(tiny_benchmark):
    pair = Benchmark("Tiny", 4)[0]
    assert pair.lr.shape == (6, 8, 3) and pair.hr.shape == (24, 32, 3)
    assert list((tiny_benchmark / "cache" / "lr" / "v1" / "x4").glob("a-*.png"))
    assert np.array_equal(Benchmark("Tiny", 4)[0].lr, pair.lr)


def test_lr_cache_of_an_older_bicubic_is_not_reused(tiny_benchmark, monkeypatch):
    pair = Benchmark("Tiny", 4)[0]
    (cached,) = (tiny_benchmark / "cache" / "lr" / "v1" / "x4").glob("a-*.png")
    Image.fromarray(np.zeros_like(pair.lr)).save(cached)  # what an older bicubic made
    assert not Benchmark("Tiny", 4)[0].lr.any()
    monkeypatch.setattr("quantlab.data.BICUBIC_VERSION", 2)
    assert np.array_equal(Benchmark("Tiny", 4)[0].lr, pair.lr)
    assert list((tiny_benchmark / "cache" / "lr" / "v2" / "x4").glob("a-*.png"))


def test_grayscale_becomes_three_channels(tiny_benchmark):
    pair = Benchmark("Tiny", 2)[1]
    assert pair.hr.shape == (24, 24, 3) and np.array_equal(pair.hr[..., 0], pair.hr[..., 2])


def test_lr_hr_mismatch_names_file_and_sizes(tiny_benchmark):
    lr_dir = tiny_benchmark / "benchmark" / "Tiny" / "LR_bicubic" / "X2"
    lr_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(lr_dir / "ax2.png")
    with pytest.raises(ValueError, match=r"a\.png.*10x10.*35x26"):
        Benchmark("Tiny", 2)[0]


@pytest.mark.parametrize("name", ["ax2.png", "a_LRBI_x2.png"], ids=["benchmark", "manga109-LRBI"])
def test_shipped_lr_is_read_under_either_naming(tiny_benchmark, name):
    """An LR file named as in the EDSR benchmark package or as Manga109's ``<name>_LRBI_x<s>.png`` is
    read instead of generated: its pixels come back, and nothing is written to the LR cache."""
    lr_dir = tiny_benchmark / "benchmark" / "Tiny" / "LR_bicubic" / "X2"
    lr_dir.mkdir(parents=True)
    shipped = np.random.default_rng(1).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    Image.fromarray(shipped).save(lr_dir / name)
    bench = Benchmark("Tiny", 2)
    assert bench.lr_path(bench.hr_paths[0]) == lr_dir / name
    assert np.array_equal(bench[0].lr, shipped)
    assert not list((tiny_benchmark / "cache").glob("lr/**/a-*.png"))


def test_unknown_set_and_missing_root_are_explained(tiny_benchmark, monkeypatch):
    with pytest.raises(FileNotFoundError, match="Tiny"):
        Benchmark("Set5", 2)
    monkeypatch.setenv("QUANTLAB_DATA", str(tiny_benchmark / "nowhere"))
    with pytest.raises(FileNotFoundError, match="QUANTLAB_DATA"):
        data_root()


def test_shared_benchmarks_have_expected_sizes():
    counts = {name: len(Benchmark(name, 4)) for name in ("Set5", "Set14", "B100", "Urban100", "Manga109")}
    assert counts == {"Set5": 5, "Set14": 14, "B100": 100, "Urban100": 22, "Manga109": 22}
    assert Benchmark("Urban100", 4).is_subset and not Benchmark("Set14", 4).is_subset
    assert Benchmark("Set5", 4, limit=1).is_subset and not Benchmark("Set5", 4, limit=5).is_subset  # quick mode


def test_dihedral_covers_eight_distinct_transforms():
    image = np.arange(12).reshape(3, 4, 1)
    assert len({dihedral(image, k).tobytes() + bytes(dihedral(image, k).shape) for k in range(8)}) == 8


def test_calibration_patches_are_seeded_lr_crops(tmp_path, monkeypatch):
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    a = calibration_patches(n=4, size=32, scale=3, seed=0)
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, calibration_patches(n=4, size=32, scale=3, seed=0))
    assert not torch.equal(a, calibration_patches(n=4, size=32, scale=3, seed=1))


def test_patch_pairs_are_aligned(tmp_path, monkeypatch):
    """An LR crop equals the bicubic downscale of its HR crop away from the borders."""
    from quantlab.imresize import imresize
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path))
    lr, hr = PatchSampler(scale=2, lr_size=32, seed=3, augment=False).sample(2)
    lr8 = np.uint8(lr[0].permute(1, 2, 0).numpy() * 255 + 0.5)
    hr8 = np.uint8(hr[0].permute(1, 2, 0).numpy() * 255 + 0.5)
    down = imresize(hr8, 0.5).astype(int)
    assert np.abs(down[4:-4, 4:-4] - lr8[4:-4, 4:-4].astype(int)).max() <= 1


def write_png16(path, image: np.ndarray) -> None:
    """A 16-bit grayscale (H, W) or RGB (H, W, 3) PNG, written by hand (Pillow cannot write 16-bit RGB)."""
    import struct
    import zlib
    h, w = image.shape[:2]
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in image)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", w, h, 16, 2 if image.ndim == 3 else 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
def test_16bit_png_decodes_to_its_8bit_scale(tmp_path, channels):
    """A 16-bit PNG reads as its high byte, whatever its low byte: grayscale is no longer saturated to
    white (Pillow's convert("RGB") clips I;16 at 255), and RGB reads as Pillow decodes it."""
    rng = np.random.default_rng(0)
    image8 = rng.integers(0, 256, (12, 10, 3)[: 2 if channels == 1 else 3], dtype=np.uint8)
    write_png16(tmp_path / "a.png",
                image8.astype(np.uint16) * 256 + rng.integers(0, 256, image8.shape, dtype=np.uint16))
    expected = image8 if channels == 3 else np.repeat(image8[..., None], 3, -1)
    assert np.array_equal(read_image(tmp_path / "a.png"), expected)


def test_opaque_alpha_is_dropped_and_palette_is_expanded(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, np.full((9, 7), 255, np.uint8)])).save(tmp_path / "rgba.png")
    assert np.array_equal(read_image(tmp_path / "rgba.png"), rgb)
    Image.fromarray(rgb).quantize(16).save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (9, 7, 3)


def test_16bit_benchmark_scores_as_its_8bit_copy(tiny_benchmark):
    """Bicubic on a 16-bit copy of a set gives the 8-bit set's PSNR/SSIM (it gave PSNR inf: all white)."""
    from quantlab.evaluation import evaluate
    hr = tiny_benchmark / "benchmark" / "Tiny" / "HR"
    wide = tiny_benchmark / "benchmark" / "Wide" / "HR"
    wide.mkdir(parents=True)
    for path in sorted(hr.glob("*.png")):
        write_png16(wide / path.name, np.array(Image.open(path)).astype(np.uint16) * 257)
    scores8, scores16 = (evaluate("bicubic", name, scale=2, progress=False) for name in ("Tiny", "Wide"))
    assert np.isfinite(scores16["psnr"]).all()
    assert np.allclose(scores16[["psnr", "ssim"]], scores8[["psnr", "ssim"]])


def test_calibration_patches_of_16bit_images_match_the_8bit_ones(train_folder, tmp_path, monkeypatch):
    """They were all ones (every 16-bit grayscale pixel saturated)."""
    monkeypatch.setenv("QUANTLAB_CACHE", str(tmp_path / "cache"))
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    wide.mkdir(), narrow.mkdir()
    for path in sorted(train_folder.glob("*.png")):
        write_png16(wide / path.name, np.array(Image.open(path).convert("L")).astype(np.uint16) * 257)
        Image.open(path).convert("L").save(narrow / path.name)
    patches = calibration_patches(n=3, size=16, scale=2, folder=wide)
    assert torch.equal(patches, calibration_patches(n=3, size=16, scale=2, folder=narrow))
    assert patches.std() > 0.05


def test_hidden_files_and_folders_named_like_images_are_not_images(tmp_path):
    """macOS copies leave ``._name.png`` resource forks beside the images; they are not images."""
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (tmp_path / "b.png").mkdir()
    assert list_images(tmp_path) == [tmp_path / "a.png"]


def test_lr_hr_mismatch_fails_before_any_image_is_decoded(tiny_benchmark, monkeypatch):
    lr_dir = tiny_benchmark / "benchmark" / "Tiny" / "LR_bicubic" / "X2"
    lr_dir.mkdir(parents=True)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(lr_dir / "grayx2.png")
    monkeypatch.setattr("quantlab.data.read_image", lambda path: pytest.fail(f"{path} was decoded"))
    with pytest.raises(ValueError, match=r"gray\.png.*10x10.*24x24"):
        Benchmark("Tiny", 2)


def test_a_damaged_lr_cache_entry_is_made_again(tiny_benchmark):
    pair = Benchmark("Tiny", 4)[0]
    (cached,) = (tiny_benchmark / "cache" / "lr" / "v1" / "x4").glob("a-*.png")
    cached.write_bytes(cached.read_bytes()[:40])
    assert np.array_equal(Benchmark("Tiny", 4)[0].lr, pair.lr)
