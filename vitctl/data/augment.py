"""Per-example decode and augmentation, declared as a big_vision-style spec string.

A spec is ops joined by "|", each `name` or `name(args)` (positional or key=value):
    "inception_crop(0.08,1.0)|flip_lr"      training (random resized crop, random flip)
    "resize_small(1.143)|central_crop"      evaluation (short side to S / 0.875, centre S x S)
    "" or "resize"                          the default: resize to S x S as `prepare` does
S is the model's image_size; the value range / mean-std come from the model config's
`Preprocess`, as for every other input path.

- `parse(spec) -> Augment`; `transform(image, cfg, aug, rng, channels=...)` decodes one
  example (encoded bytes or a uint8 HWC array), applies the ops, resizes to S and normalizes.
- Randomness comes from `example_rng(seed, epoch, index)` only, so the crops a training step
  sees do not depend on the number of processes or workers that made them.
- With no ops (or only `resize`) the result is `prepare(image[None], cfg)[0]` bit for bit:
  the numpy port of jax.image.resize, the config's method and antialias flag.
- With ops, geometry runs on PIL images: a crop is cut before anything is resized, JPEGs are
  decoded at 1/2, 1/4 or 1/8 scale when the crop is still at least S px after it
  (`Image.draft`, the DCT-domain reduction), and resizes are PIL's antialiased bilinear with a
  `reducing_gap` (box-reduce first when shrinking by 3x or more). Everything stays uint8 until
  the final float32 normalize.
- randaugment: the 14 ops of RandAugment (arXiv:1909.13719, Table 1 / the TF reference
  autoaugment.py), magnitudes 0..10 as there; each layer picks one op uniformly and applies it
  with probability 0.5 (timm's default). Enhancement factors are 1 +/- 0.9 * m / 10 and
  posterize keeps 8 - 4 * m / 10 bits (timm's "increasing" variants), so magnitude 0 is the
  identity for every op.

Shape letters: H/W height/width, C channels, S the model's image size.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import re
import warnings
from collections.abc import Callable

import numpy as np

from vitctl.data.preprocess import normalize, prepare, resize
from vitctl.data.sources.common import to_channels
from vitctl.data.sources.images import MAX_IMAGE_PIXELS
from vitctl.errors import ConfigError, DataError, VitctlError

ASPECT_RANGE = (3 / 4, 4 / 3)  # Inception (arXiv:1409.4842 sec. 6) and torchvision RandomResizedCrop
CROP_TRIES = 10  # then a central crop, as torchvision
REDUCING_GAP = 3.0  # PIL: a big shrink first reduce()s by an integer factor, leaving a resample of >= 3x (close to one full resample)
FILL = 128  # grey for the area rotate/shear/translate uncover (TF autoaugment's replace value)


@dataclasses.dataclass(frozen=True)
class Op:
    """One op of a spec: its name (a key of OPS) and its arguments (all filled in, in OPS order)."""

    name: str
    args: tuple[float, ...] = ()

    def __str__(self) -> str:
        args = ",".join(repr(a).removesuffix(".0") for a in self.args)  # repr, so that parse(str(op)) gives the same floats
        return f"{self.name}({args})" if args else self.name


@dataclasses.dataclass(frozen=True)
class Augment:
    """A parsed spec: the ops in order. `str(aug)` gives the spec back, every argument spelled out."""

    ops: tuple[Op, ...] = ()

    def __str__(self) -> str:
        return "|".join(map(str, self.ops))

    @property
    def random(self) -> bool:
        """Whether any op draws from the example's rng."""
        return any(OPS[op.name].random for op in self.ops)


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The one source of an example's randomness: a function of (seed, epoch, example index) only."""
    return np.random.default_rng((seed, epoch, index))


# --------------------------------------------------------------------------- geometry


def crop_box(h: int, w: int, rng: np.random.Generator, area_min: float = 0.08, area_max: float = 1.0) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of an h x w image, as torchvision's RandomResizedCrop.get_params.

    Up to CROP_TRIES draws of an area share in [area_min, area_max] and a log-uniform aspect
    ratio (width / height) in ASPECT_RANGE; the first that fits wins. Otherwise the largest
    central crop whose aspect ratio is clamped to ASPECT_RANGE.
    """
    area = h * w
    log_lo, log_hi = math.log(ASPECT_RANGE[0]), math.log(ASPECT_RANGE[1])
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(area_min, area_max)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h
    if ratio < ASPECT_RANGE[0]:
        cw, ch = w, round(w / ASPECT_RANGE[0])
    elif ratio > ASPECT_RANGE[1]:
        ch, cw = h, round(h * ASPECT_RANGE[1])
    else:
        ch, cw = h, w
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _draft(im, mode: str, max_scale: float) -> float:
    """Let a not-yet-decoded JPEG decode at 1/2, 1/4 or 1/8 scale, the largest not above `max_scale`.

    Returns the scale taken: 1 for other formats, an image already decoded, or max_scale < 2.
    """
    s, w0 = next((s for s in (8, 4, 2) if s <= max_scale), 1), im.size[0]
    got = im.draft(mode, (w0 // s, im.size[1] // s)) if s > 1 else None
    return w0 / got[1][2] if got else 1.0  # draft's box is the full image in reduced pixels


def _ready(im, mode: str):
    return im if im.mode == mode else im.convert(mode)


def _pil():
    from PIL import Image

    return Image


@dataclasses.dataclass(frozen=True)
class _Ctx:
    size: int  # S
    mode: str  # "L" or "RGB"
    cfg: object  # the ViTConfig, for the `resize` op's method


def _inception_crop(im, args, rng, ctx: _Ctx):
    top, left, ch, cw = crop_box(im.size[1], im.size[0], rng, *args)
    k = _draft(im, ctx.mode, min(ch, cw) / ctx.size)  # the crop keeps at least S px per side
    box = (left / k, top / k, (left + cw) / k, (top + ch) / k)
    return _ready(im, ctx.mode).resize((ctx.size, ctx.size), _pil().Resampling.BILINEAR, box=box, reducing_gap=REDUCING_GAP)


def _flip_lr(im, args, rng, ctx: _Ctx):
    return im.transpose(_pil().Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else im


def _resize_small(im, args, rng, ctx: _Ctx):
    (ratio,) = args
    short = max(1, round(ctx.size * ratio))
    _draft(im, ctx.mode, min(im.size) / short)
    im = _ready(im, ctx.mode)
    w, h = im.size  # after any draft
    new = (max(1, round(w * short / min(w, h))), max(1, round(h * short / min(w, h))))
    return im if new == im.size else im.resize(new, _pil().Resampling.BILINEAR, reducing_gap=REDUCING_GAP)


def _central_crop(im, args, rng, ctx: _Ctx):
    w, h = im.size
    cw, ch = min(w, ctx.size), min(h, ctx.size)
    top, left = (h - ch) // 2, (w - cw) // 2
    return _ready(im, ctx.mode).crop((left, top, left + cw, top + ch))


def _resize(im, args, rng, ctx: _Ctx):
    """S x S by the config's own resize (the numpy port of jax.image.resize), rounded back to uint8 for the ops after it."""
    spec, s = ctx.cfg.preprocess, ctx.size
    x = np.asarray(_ready(im, ctx.mode), np.float32)
    x = x[None, ..., None] if x.ndim == 2 else x[None]
    if x.shape[1:3] != (s, s):
        x = resize(x, (s, s), spec.resize, spec.antialias)
    x = np.clip(np.round(x[0]), 0, 255).astype(np.uint8)
    return _pil().fromarray(x[..., 0] if ctx.mode == "L" else x)  # uint8 [H, W] is "L", [H, W, 3] "RGB"


# --------------------------------------------------------------------------- randaugment


def _signed(v: float, rng) -> float:
    return -v if rng.random() < 0.5 else v


def _affine(im, coeffs):
    fill = FILL if im.mode == "L" else (FILL,) * 3
    return im.transform(im.size, _pil().Transform.AFFINE, coeffs, _pil().Resampling.BILINEAR, fillcolor=fill)


def _enhance(kind: str):
    def op(im, m, rng):
        from PIL import ImageEnhance

        return getattr(ImageEnhance, kind)(im).enhance(1.0 + _signed(0.9 * m, rng))

    return op


def _ops_module():
    from PIL import ImageOps

    return ImageOps


# name -> f(image, m, rng) with m = magnitude / 10 in [0, 1]; ranges from the TF reference
# (rotate 30 degrees, shear 0.3, translate 0.45 of the side, i.e. 100 px at 224) and timm.
RANDAUGMENT_OPS: dict[str, Callable] = {
    "identity": lambda im, m, rng: im,
    "autocontrast": lambda im, m, rng: _ops_module().autocontrast(im),
    "equalize": lambda im, m, rng: _ops_module().equalize(im),
    "rotate": lambda im, m, rng: im.rotate(
        _signed(30.0 * m, rng), _pil().Resampling.BILINEAR, fillcolor=FILL if im.mode == "L" else (FILL,) * 3
    ),
    "solarize": lambda im, m, rng: _ops_module().solarize(im, 256 - int(256 * m)),
    "color": _enhance("Color"),
    "posterize": lambda im, m, rng: _ops_module().posterize(im, 8 - int(4 * m)),
    "contrast": _enhance("Contrast"),
    "brightness": _enhance("Brightness"),
    "sharpness": _enhance("Sharpness"),
    "shear_x": lambda im, m, rng: _affine(im, (1, _signed(0.3 * m, rng), 0, 0, 1, 0)),
    "shear_y": lambda im, m, rng: _affine(im, (1, 0, 0, _signed(0.3 * m, rng), 1, 0)),
    "translate_x": lambda im, m, rng: _affine(im, (1, 0, _signed(0.45 * m, rng) * im.size[0], 0, 1, 0)),
    "translate_y": lambda im, m, rng: _affine(im, (1, 0, 0, 0, 1, _signed(0.45 * m, rng) * im.size[1])),
}
_RA_NAMES = tuple(RANDAUGMENT_OPS)


def _randaugment(im, args, rng, ctx: _Ctx):
    num_layers, magnitude = args
    im = _ready(im, ctx.mode)
    for _ in range(int(num_layers)):
        name = _RA_NAMES[int(rng.integers(len(_RA_NAMES)))]
        if rng.random() < 0.5:
            im = RANDAUGMENT_OPS[name](im, magnitude / 10.0, rng)
    return im


# --------------------------------------------------------------------------- the op table


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """An op's parameters (name, default, type, lowest, highest), whether it draws randomness, and its function."""

    params: tuple[tuple[str, float, type, float, float], ...]
    random: bool
    apply: Callable


OPS: dict[str, OpSpec] = {
    "inception_crop": OpSpec((("area_min", 0.08, float, 1e-6, 1.0), ("area_max", 1.0, float, 1e-6, 1.0)), True, _inception_crop),
    "flip_lr": OpSpec((), True, _flip_lr),
    "randaugment": OpSpec((("num_layers", 2, int, 0, 32), ("magnitude", 10, float, 0.0, 10.0)), True, _randaugment),
    "resize_small": OpSpec((("ratio", 1 / 0.875, float, 1e-3, 64.0),), False, _resize_small),  # big_vision: short side S / 0.875
    "central_crop": OpSpec((), False, _central_crop),
    "resize": OpSpec((), False, _resize),
}
_OP = re.compile(r"([a-z_]+)\s*(?:\((.*)\))?", re.DOTALL)


def _hint(name: str | None = None) -> str:
    ops = "augmentation ops: " + ", ".join(map(_signature, OPS)) + ', joined by "|", e.g. "inception_crop(0.08,1.0)|flip_lr"'
    return f"{_signature(name)}; {ops}" if name else ops


def _signature(name: str) -> str:
    params = OPS[name].params
    return name + (f"({', '.join(f'{p}={d:g}' for p, d, *_ in params)})" if params else "")


def parse(spec: str) -> Augment:
    """A spec string -> Augment. "" (or only spaces) is no augmentation.

    Raises:
        ConfigError: an unknown op, a malformed op, or an argument of the wrong type or out of range.
    """
    spec = str(spec)
    if not spec.strip():
        return Augment()
    return Augment(tuple(_parse_op(part.strip(), spec) for part in spec.split("|")))


def _parse_op(text: str, spec: str) -> Op:
    m = _OP.fullmatch(text)
    if not m or m.group(1) not in OPS:
        what = f"unknown op '{m.group(1)}'" if m else f"cannot read op '{text}'"
        raise ConfigError(f"augmentation spec '{spec}': {what}", hint=_hint())
    name, params = m.group(1), OPS[m.group(1)].params
    raw = [a.strip() for a in m.group(2).split(",")] if m.group(2) and m.group(2).strip() else []
    values = {p: d for p, d, *_ in params}
    if len(raw) > len(params):
        raise ConfigError(f"augmentation spec '{spec}': {name} takes {len(params)} argument(s), got {len(raw)}", hint=_hint())
    for i, a in enumerate(raw):
        key, _, val = a.rpartition("=")
        key = key.strip() or params[i][0]
        if key not in values:
            raise ConfigError(f"augmentation spec '{spec}': {name} has no argument '{key}'", hint=_hint(name))
        values[key] = _value(val.strip(), key, name, spec)
    for p, _, kind, lo, hi in params:
        if not lo <= values[p] <= hi or kind is int and values[p] != int(values[p]):
            raise ConfigError(f"augmentation spec '{spec}': {name} {p}={values[p]:g} must be {kind.__name__} in [{lo:g}, {hi:g}]",
                              hint=_hint(name))  # fmt: skip
    if name == "inception_crop" and values["area_min"] > values["area_max"]:
        raise ConfigError(f"augmentation spec '{spec}': inception_crop area_min > area_max", hint=_hint(name))
    return Op(name, tuple(float(values[p]) for p, *_ in params))


def _value(text: str, key: str, name: str, spec: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ConfigError(f"augmentation spec '{spec}': {name} {key}='{text}' is not a number", hint=_hint(name)) from None
    if not math.isfinite(v):
        raise ConfigError(f"augmentation spec '{spec}': {name} {key}={text} is not finite", hint=_hint(name))
    return v


# --------------------------------------------------------------------------- transform


def transform(image: bytes | np.ndarray, cfg, aug: Augment | None, rng: np.random.Generator | None, *, channels: int) -> np.ndarray:
    """One example -> float32 [S, S, cfg.channels] model input (S = cfg.image_size).

    Args:
        image: encoded image bytes (PNG, JPEG, ... anything PIL reads) or a uint8 [H, W(, C)] array.
        cfg: the ViTConfig: image_size, channels and preprocess (resize method, value range).
        aug: the ops to apply; None or empty (or only `resize`): exactly `prepare(image[None], cfg)[0]`.
        rng: the example's generator (`example_rng`); needed when an op is random.
        channels: the source's channels: 1 (luminance) or 3 (RGB), as load_dataset's `channels`.

    Raises:
        DataError: bytes that do not decode (the caller names the file or record).
    """
    ops = list(aug.ops) if aug else []
    while ops and ops[-1].name == "resize":  # resizing to S x S is the final step anyway, done as prepare does
        ops.pop()
    if rng is None and any(OPS[op.name].random for op in ops):
        raise ValueError(f"augmentation '{Augment(tuple(ops))}' is random: pass rng=example_rng(seed, epoch, index)")
    mode = "L" if channels == 1 else "RGB"
    try:
        if not ops:
            x = np.asarray(_open(image).convert(mode)) if _is_encoded(image) else np.asarray(image)
        else:
            im = _open(image) if _is_encoded(image) else _from_array(np.asarray(image), channels)
            ctx = _Ctx(cfg.image_size, mode, cfg)
            for op in ops:
                im = OPS[op.name].apply(im, op.args, rng, ctx)
            return _finish(to_channels(np.asarray(_ready(im, mode)), channels), cfg)
    except VitctlError:
        raise
    except Exception as e:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, ... for bad data
        raise DataError(f"cannot decode the image: {e}", hint="the image data is corrupt or not an image; remove or replace it") from None
    return _finish(to_channels(x, channels), cfg)


def _finish(x: np.ndarray, cfg) -> np.ndarray:
    """uint8 [H, W, C] -> prepare(x[None], cfg)[0], the same floats; an S x S image through a table of the 256 values.

    normalize() broadcasts over a last axis of 3, which numpy runs as 3-element inner loops;
    one gather per channel from the table (normalize applied to 0..255) is several times faster.
    """
    s, c = cfg.image_size, cfg.channels
    if x.shape[:2] != (s, s) or x.shape[-1] not in (1, c):
        return prepare(x[None], cfg)[0]
    table = _value_table(cfg.preprocess, c)
    if table.shape != (256, c):  # mean/std of another length: prepare's own broadcasting decides
        return prepare(x[None], cfg)[0]
    x = np.repeat(x, c, axis=-1) if x.shape[-1] != c else x
    out = np.empty(x.shape, np.float32)
    for k in range(c):
        np.take(table[:, k], x[..., k], out=out[..., k], mode="clip")
    return out


@functools.lru_cache(maxsize=16)
def _value_table(spec, channels: int) -> np.ndarray:
    """[256, channels] float32: what prepare maps each uint8 value of each channel to (the same float32 operations)."""
    values = np.repeat(np.arange(256, dtype=np.float32)[:, None], channels, axis=1)
    return np.asarray(normalize(values, spec), np.float32)


def _is_encoded(image) -> bool:
    return isinstance(image, (bytes, bytearray, memoryview))


def _open(data):
    """A lazily decoded PIL image of encoded bytes, its declared size checked first."""
    Image = _pil()
    with warnings.catch_warnings():
        # PIL only warns between its own limit and twice that; vitctl's limit is lower and checked below.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        im = Image.open(io.BytesIO(data))
    w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise DataError(f"the image declares {w} x {h} pixels, more than vitctl decodes ({MAX_IMAGE_PIXELS})",
                        hint="the file is damaged or a decompression bomb; remove it, or shrink the image first")  # fmt: skip
    return im


def _from_array(x: np.ndarray, channels: int):
    if x.dtype != np.uint8:
        raise DataError(
            f"images must be uint8 arrays (or encoded bytes), got {x.dtype} {x.shape}", hint="records hold uint8 [H, W, C] pixels"
        )
    x = to_channels(x, channels)
    return _pil().fromarray(np.ascontiguousarray(x[..., 0] if channels == 1 else x))  # uint8 [H, W] is "L", [H, W, 3] "RGB"
