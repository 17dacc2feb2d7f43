"""vitctl.data.augment: the default path is prepare() bit for bit; ops, determinism, geometry, errors, speed (printed)."""

import dataclasses
import io
import time

import numpy as np
import pytest

from tests.conftest import tiny
from vitctl.config import Preprocess, ViTConfig
from vitctl.data import augment
from vitctl.data.augment import RANDAUGMENT_OPS, Augment, Op, crop_box, example_rng, parse, transform
from vitctl.data.preprocess import prepare
from vitctl.data.sources import load_dataset
from vitctl.errors import ConfigError, DataError

PIL = pytest.importorskip("PIL")
from PIL import Image

PREPROCESS = [
    Preprocess(),
    Preprocess(resize="bicubic", antialias=True),
    Preprocess(resize="nearest", value_range=(0.0, 1.0)),
    Preprocess(value_range=None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
]


def smooth_image(h, w, seed=0):
    """A photo-like uint8 RGB image: low-frequency colour fields plus a little noise (compresses like a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy + rng.uniform())) for _ in range(3)]
    x = 127.5 + 100 * np.stack(chans, -1) + rng.normal(0, 8, (h, w, 3))
    return np.clip(x, 0, 255).astype(np.uint8)


def encode(x, fmt="PNG", **kw):
    buf = io.BytesIO()
    Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, fmt, **kw)
    return buf.getvalue()


def pil_reference(x, size, box):
    """What inception_crop should produce for an array input: PIL's bilinear crop-resize of that box."""
    im = Image.fromarray(x).resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=augment.REDUCING_GAP)
    return np.asarray(im)


# --------------------------------------------------------------------------- the default path


@pytest.mark.parametrize("spec", ["", "resize", "resize|resize"])
def test_default_is_prepare_bit_for_bit_on_digits(spec):
    ds = load_dataset("digits", "train")
    for cfg in (tiny(), tiny(channels=1, preprocess=PREPROCESS[1])):
        channels = cfg.channels
        images = ds.images if channels == 3 else ds.images[..., :1]
        want = prepare(images, cfg)
        got = np.stack([transform(im, cfg, parse(spec), None, channels=channels) for im in images])
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("pre", PREPROCESS)
@pytest.mark.parametrize("shape", [(5, 7, 3), (33, 20, 1), (16, 16, 3), (16, 16, 1), (64, 48, 3), (17, 90, 3)])
def test_default_is_prepare_bit_for_bit_on_random_arrays(pre, shape):
    cfg = tiny(preprocess=pre)
    x = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    want = prepare(x[None], cfg)[0]
    for aug in (None, Augment(), parse("resize")):
        np.testing.assert_array_equal(transform(x, cfg, aug, None, channels=shape[-1]), want)


def test_default_on_png_bytes_is_decode_then_prepare():
    cfg = tiny()
    for shape in [(20, 30, 3), (9, 9, 1)]:
        x = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        got = transform(encode(x), cfg, None, None, channels=shape[-1])
        np.testing.assert_array_equal(got, prepare(x[None], cfg)[0])
    rgb = np.random.default_rng(2).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    gray = np.asarray(Image.fromarray(rgb).convert("L"))[..., None]  # channels=1: PIL's luminance, as read_image_folder
    np.testing.assert_array_equal(
        transform(encode(rgb), tiny(channels=1), None, None, channels=1), prepare(gray[None], tiny(channels=1))[0]
    )


# --------------------------------------------------------------------------- determinism and geometry


def test_same_seed_epoch_index_same_output_else_different():
    cfg, aug = tiny(image_size=32), parse("inception_crop|flip_lr|randaugment")
    x = encode(smooth_image(120, 90), "JPEG", quality=90)
    a = transform(x, cfg, aug, example_rng(7, 1, 3), channels=3)
    np.testing.assert_array_equal(a, transform(x, cfg, aug, example_rng(7, 1, 3), channels=3))
    for other in [(7, 1, 4), (7, 2, 3), (8, 1, 3)]:
        assert not np.array_equal(a, transform(x, cfg, aug, example_rng(*other), channels=3)), other
    assert example_rng(0, 0, 5).integers(1 << 62) == example_rng(0, 0, 5).integers(1 << 62)


@pytest.mark.parametrize(
    ("h", "w", "area"), [(375, 500, (0.08, 1.0)), (224, 224, (0.3, 0.5)), (40, 1000, (0.08, 1.0)), (1000, 30, (0.5, 1.0))]
)
def test_crop_box_area_and_aspect(h, w, area):
    fallbacks = 0
    for i in range(300):
        top, left, ch, cw = crop_box(h, w, example_rng(0, 0, i), *area)
        assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
        share = ch * cw / (h * w)
        tol = (ch + cw + 1) / (h * w)  # rounding each side to whole pixels
        if area[0] - tol <= share <= area[1] + tol and 3 / 4 - 1 / ch - 1e-9 <= cw / ch <= 4 / 3 + 1 / ch + 1e-9:
            continue
        fallbacks += 1  # the central crop after CROP_TRIES misses: centred, aspect ratio clamped
        assert (top, left) == ((h - ch) // 2, (w - cw) // 2)
        assert (ch, cw) in [(h, w), (h, round(h * 4 / 3)), (round(w * 4 / 3), w)]
    thin = min(h, w) ** 2 * 4 / 3 < area[0] * h * w  # no crop of that area fits with an aspect ratio in 3:4..4:3
    assert fallbacks == 300 if thin else fallbacks < 5


def test_inception_crop_cuts_the_chosen_box_then_resizes():
    x, s = smooth_image(75, 100, seed=3), 24
    cfg = tiny(image_size=s, preprocess=Preprocess(value_range=(0.0, 255.0)))  # identity value map: pixels stay readable
    for i in range(5):
        top, left, ch, cw = crop_box(75, 100, example_rng(1, 0, i), 0.2, 0.9)
        got = transform(x, cfg, parse("inception_crop(0.2,0.9)"), example_rng(1, 0, i), channels=3)
        np.testing.assert_array_equal(got, pil_reference(x, s, (left, top, left + cw, top + ch)).astype(np.float32))


def test_jpeg_reduced_decode_keeps_the_same_crop(monkeypatch):
    """Big crops of a big JPEG decode at 1/2..1/8 scale (Image.draft); the crop must still be the same region."""
    scales, draft = [], augment._draft
    monkeypatch.setattr(augment, "_draft", lambda *a: scales.append(draft(*a)) or scales[-1])
    x = smooth_image(900, 1200, seed=4)
    jpeg, cfg, aug = encode(x, "JPEG", quality=95), tiny(image_size=64), parse("inception_crop(0.3,1.0)")
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)))
    for i in range(6):
        *_, ch, cw = crop_box(900, 1200, example_rng(0, 0, i), 0.3, 1.0)
        assert min(ch, cw) >= 2 * 64  # so each of these takes the reduced decode
        got = transform(jpeg, cfg, aug, example_rng(0, 0, i), channels=3)
        want = transform(decoded, cfg, aug, example_rng(0, 0, i), channels=3)
        assert np.abs(got - want).mean() < 0.03, i  # values in [-1, 1]; a box off by a few px differs ~10x more
    assert all(s >= 2 for s in scales[::2]) and all(s == 1 for s in scales[1::2])  # the JPEG decodes reduced, the array cannot
    eval_aug = parse("resize_small|central_crop")
    assert np.abs(transform(jpeg, cfg, eval_aug, None, channels=3) - transform(decoded, cfg, eval_aug, None, channels=3)).mean() < 0.03


def test_flip_lr_flips_half_the_examples():
    x, cfg = smooth_image(16, 16, seed=5), tiny()
    plain = transform(x, cfg, None, None, channels=3)
    flips = 0
    for i in range(40):
        got = transform(x, cfg, parse("flip_lr"), example_rng(0, 0, i), channels=3)
        flipped = example_rng(0, 0, i).random() < 0.5
        np.testing.assert_array_equal(got, plain[:, ::-1] if flipped else plain)
        flips += flipped
    assert 10 < flips < 30


def test_eval_resize_small_then_central_crop_geometry():
    x, s = smooth_image(200, 300, seed=6), 32
    cfg = tiny(image_size=s, preprocess=Preprocess(value_range=(0.0, 255.0)))
    short = round(s * 1.25)  # 40: the image becomes 60 x 40, the crop its centre
    ref = Image.fromarray(x).resize((60, 40), Image.Resampling.BILINEAR, reducing_gap=augment.REDUCING_GAP)
    want = np.asarray(ref.crop((14, 4, 46, 36)), np.float32)
    assert short == 40
    np.testing.assert_array_equal(transform(x, cfg, parse("resize_small(1.25)|central_crop"), None, channels=3), want)
    # big_vision's default: short side S / 0.875 (256 for 224)
    assert parse("resize_small").ops[0].args == (1 / 0.875,) and round(224 / 0.875) == 256
    # portrait, and an image smaller than S: the crop is what there is, then resized to S by the config's method
    tall = transform(smooth_image(300, 100), tiny(image_size=16), parse("resize_small|central_crop"), None, channels=3)
    small = transform(smooth_image(10, 12), tiny(image_size=16), parse("central_crop"), None, channels=3)
    assert tall.shape == small.shape == (16, 16, 3)
    np.testing.assert_array_equal(small, prepare(smooth_image(10, 12)[None], tiny(image_size=16))[0])


def test_randaugment_runs_every_op_and_is_deterministic(monkeypatch):
    rgb, gray = Image.fromarray(smooth_image(24, 24)), Image.fromarray(smooth_image(24, 24)[..., 0])
    assert len(RANDAUGMENT_OPS) == 14
    for name, op in RANDAUGMENT_OPS.items():
        for im in (rgb, gray):
            for m in (0.0, 0.5, 1.0):
                out = op(im, m, example_rng(0, 0, 0))
                assert out.size == im.size and out.mode == im.mode, name
            if name not in ("autocontrast", "equalize"):  # magnitude 0 is the identity
                np.testing.assert_array_equal(np.asarray(op(im, 0.0, example_rng(0, 0, 0))), np.asarray(im), err_msg=name)
    seen = set()
    for name, op in list(RANDAUGMENT_OPS.items()):
        monkeypatch.setitem(RANDAUGMENT_OPS, name, lambda im, m, rng, name=name, op=op: seen.add(name) or op(im, m, rng))
    cfg, aug, x = tiny(), parse("randaugment(3,9)"), smooth_image(16, 16)
    outs = [transform(x, cfg, aug, example_rng(0, 0, i), channels=3) for i in range(150)]
    assert seen == set(RANDAUGMENT_OPS)
    np.testing.assert_array_equal(outs[17], transform(x, cfg, aug, example_rng(0, 0, 17), channels=3))
    assert transform(x, tiny(channels=1), aug, example_rng(0, 0, 1), channels=1).shape == (16, 16, 1)


def test_resize_in_the_middle_runs_the_later_ops_at_s():
    x, cfg = smooth_image(40, 30, seed=8), tiny(preprocess=Preprocess(value_range=(0.0, 255.0)))
    resized = np.round(prepare(x[None], cfg)[0])  # the config's resize, back to uint8 for the ops after it
    for i in range(6):
        got = transform(x, cfg, parse("resize|flip_lr"), example_rng(0, 0, i), channels=3)
        np.testing.assert_array_equal(got, resized[:, ::-1] if example_rng(0, 0, i).random() < 0.5 else resized)


@pytest.mark.parametrize(("mode", "fmt"), [("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("I;16", "PNG"), ("CMYK", "JPEG"), ("L", "JPEG")])
def test_any_pil_mode_decodes_like_load_dataset(mode, fmt):
    im = Image.fromarray(smooth_image(40, 50, seed=9)).convert(mode if mode != "I;16" else "L")
    im = im.convert("I;16") if mode == "I;16" else im
    buf = io.BytesIO()
    im.save(buf, fmt)
    data = buf.getvalue()
    for channels in (1, 3):
        cfg = tiny(channels=channels)
        with Image.open(io.BytesIO(data)) as ref:
            want = np.asarray(ref.convert("L" if channels == 1 else "RGB"))  # sources.images.decode's rule
        np.testing.assert_array_equal(transform(data, cfg, None, None, channels=channels), prepare(want.reshape(40, 50, -1)[None], cfg)[0])
        assert transform(data, cfg, parse("inception_crop|flip_lr|randaugment"), example_rng(0, 0, 0), channels=channels).shape == (
            16,
            16,
            channels,
        )


# --------------------------------------------------------------------------- the spec and errors


def test_parse_fills_defaults_and_round_trips():
    aug = parse(" inception_crop(0.08, 1.0) | flip_lr|randaugment(num_layers=3)|resize_small(1.143)|central_crop ")
    assert [op.name for op in aug.ops] == ["inception_crop", "flip_lr", "randaugment", "resize_small", "central_crop"]
    assert aug.ops[0] == Op("inception_crop", (0.08, 1.0)) and aug.ops[2].args == (3.0, 10.0)
    assert parse(str(aug)) == aug and aug.random and not parse("resize_small|central_crop").random
    assert parse("") == parse("  ") == Augment() and str(Augment()) == ""
    assert parse("inception_crop(area_max=0.5)").ops[0].args == (0.08, 0.5)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("inception_crop|flip_ud", "unknown op 'flip_ud'"),
        ("inception_crop||flip_lr", "cannot read op ''"),
        ("inception_crop(0.08,x)", "area_max='x' is not a number"),
        ("inception_crop(0, 1)", "area_min=0 must be float in"),
        ("inception_crop(0.5,0.2)", "area_min > area_max"),
        ("inception_crop(0.1,0.5,3)", "takes 2 argument(s), got 3"),
        ("randaugment(2.5)", "num_layers=2.5 must be int"),
        ("randaugment(magnitude=11)", "magnitude=11 must be float in [0, 10]"),
        ("randaugment(depth=2)", "has no argument 'depth'"),
        ("flip_lr(0.5)", "takes 0 argument(s)"),
        ("resize_small(nan)", "is not finite"),
    ],
)
def test_bad_spec_names_the_problem_and_lists_ops(spec, words):
    with pytest.raises(ConfigError) as e:
        parse(spec)
    assert words in str(e.value) and spec in str(e.value)
    assert e.value.exit_code == 2 and "inception_crop" in e.value.hint


def test_corrupt_bytes_and_missing_rng_are_clear():
    good = encode(smooth_image(40, 40), "JPEG")
    for data in (b"not an image", good[: len(good) // 2], b""):
        for aug in (None, parse("inception_crop|flip_lr")):
            with pytest.raises(DataError, match="cannot decode the image"):
                transform(data, tiny(), aug, example_rng(0, 0, 0), channels=3)
    with pytest.raises(ValueError, match="example_rng"):
        transform(good, tiny(), parse("flip_lr"), None, channels=3)
    with pytest.raises(DataError, match="must be uint8"):
        transform(np.zeros((4, 4, 3), np.float32), tiny(), parse("flip_lr"), example_rng(0, 0, 0), channels=3)
    with pytest.raises(DataError, match="3 channels, the model 1"):
        transform(good, tiny(channels=1), None, None, channels=3)


# --------------------------------------------------------------------------- speed (printed, never asserted)


def test_train_transform_speed_against_torchvision(capsys):
    """images/s, one process and thread, decode + random resized crop + flip + resize to 224 + normalize, on the same JPEGs."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("torchvision.transforms")
    jpegs = [encode(smooth_image(375, 500, seed=i), "JPEG", quality=90) for i in range(16)]
    cfg = dataclasses.replace(ViTConfig(), preprocess=Preprocess(value_range=None, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    ours = parse("inception_crop|flip_lr")
    tv = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(cfg.preprocess.mean, cfg.preprocess.std)])
    fns = {
        "vitctl": lambda i, b: transform(b, cfg, ours, example_rng(0, 0, i), channels=3),
        "torchvision": lambda i, b: tv(Image.open(io.BytesIO(b)).convert("RGB")),
    }
    rates, threads = dict.fromkeys(fns, 0.0), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(3):  # best of 3, the two interleaved: a busy machine slows both alike
            for name, fn in fns.items():
                t = time.perf_counter()
                for i, b in enumerate(jpegs):
                    fn(i, b)
                rates[name] = max(rates[name], len(jpegs) / (time.perf_counter() - t))
    finally:
        torch.set_num_threads(threads)
    with capsys.disabled():
        print(f"\n500x375 JPEG -> 224 train transform: vitctl {rates['vitctl']:.0f} img/s, torchvision {rates['torchvision']:.0f} img/s")
    assert transform(jpegs[0], cfg, ours, example_rng(0, 0, 0), channels=3).shape == (224, 224, 3)
