"""Weak and strong (RandAugment) views for UDA and Meta Pseudo Labels, deterministic under a generator.

Op sets: exactly the paper's Table 5 (Appendix C.2). SVHN drops Rotate (6 vs 9) and TranslateX (an 8 pushed
half out of the frame reads as a 3); CIFAR-10 and ImageNet keep all 15, SamplePairing included.

Magnitude: RandAugment's M on the 0-10 scale of AutoAugment, UDA and MPL's TF code (`_MAX_LEVEL = 10`).
With r = M / 10, each op gets  level = sign * r * MAX_LEVEL[op]  (a random sign only for symmetric ops):

    op                                    MAX_LEVEL   applied as
    Brightness, Color, Contrast, Sharpness  0.9       factor 1 + level in [0.1, 1.9]  (torchvision convention)
    Rotate                                  30        degrees
    ShearX, ShearY                          0.3       shear factor (tan of the angle), about the top-left
                                                      corner as in PIL, UDA and torchvision's RandAugment
    TranslateX, TranslateY                  0.3       fraction of the width / height (`max_translate`);
                                                      UDA moves 10 px at 32 (0.31), AutoAugment 150/331
                                                      (0.45), MPL's TF CIFAR code size/8
    Posterize                               4         keep 8 - round(level) bits: 8 at M=0, 4 at M=10
    Solarize                                256       invert pixels >= 256 - level: none at M=0, all at 10
    SamplePairing                           0.4       weight of the partner image (AutoAugment's [0, 0.4])
    AutoContrast, Equalize, Invert          -         no magnitude

Magnitudes above 10 extrapolate linearly (MPL's TF code trains with M=17 on this scale); each op clamps its
argument to its valid range. Pixels that geometric ops uncover are filled with gray 128 (MPL's TF code),
resampling is nearest. As in RandAugment, the chosen ops are always applied; MPL's TF code instead skips
each with probability 1 - p, p ~ U(0.2, 0.8), which this module does not do.

SamplePairing blends the image with a partner image, which a per-example transform does not have. The
partner comes from the caller, either per call (`pair=`) or, cheaper, from a `pair_sampler(generator)` given
at construction that loads a random example, e.g. an index drawn with the same generator; it is fetched only
when SamplePairing is drawn. `strong_transform` passes the partner through the same weak view first. A set
with SamplePairing and neither source fails on every call, not only on the calls that draw it.

Determinism: every transform draws its randomness from the `torch.Generator` passed to `__call__`, in a fixed
order, and from nothing else (None falls back to torch's global generator). The data pipeline makes each
example's views a pure function of (seed, epoch, index), which exact resume needs:

    g = augment_generator(seed, epoch, index)
    x_weak, x_strong = weak(img, g), strong(img, g)

Images: PIL images or uint8 CHW tensors; every transform returns the type, size, mode and dtype it was given.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

__all__ = [
    "OP_SETS",
    "OPS",
    "Cutout",
    "PadCropFlip",
    "RandAugment",
    "ResizedCropFlip",
    "SampledOp",
    "StrongTransform",
    "augment_generator",
    "sample_pairing",
    "strong_transform",
    "weak_transform",
]

ImageT = TypeVar("ImageT", Image.Image, torch.Tensor)
PairSampler = Callable[[torch.Generator], "Image.Image | torch.Tensor"]

MAX_MAGNITUDE = 10.0
FILL = 128
_GEOMETRY_INTERPOLATION = InterpolationMode.NEAREST

# Paper, Table 5, in the table's order.
_CIFAR10_IMAGENET_OPS = (
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Invert", "Sharpness", "Posterize",
    "SamplePairing", "Solarize", "Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY",
)  # fmt: skip
_SVHN_OPS = (
    "AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Invert", "Sharpness", "Posterize",
    "Solarize", "ShearX", "ShearY", "TranslateY",
)  # fmt: skip
OP_SETS: dict[str, tuple[str, ...]] = {
    "cifar10": _CIFAR10_IMAGENET_OPS,
    "imagenet": _CIFAR10_IMAGENET_OPS,
    "svhn": _SVHN_OPS,
}


# ---------------------------------------------------------------------------------------------------------
# Ops: (image, level) -> image, with level = sign * (M / 10) * MAX_LEVEL (see the module docstring).


def _enhance(adjust: Callable[[ImageT, float], ImageT]) -> Callable[[ImageT, float], ImageT]:
    return lambda img, level: adjust(img, max(0.0, 1.0 + level))


def _posterize(img: ImageT, level: float) -> ImageT:
    return F.posterize(img, min(8, max(1, 8 - round(level))))


def _solarize(img: ImageT, level: float) -> ImageT:
    threshold = 256.0 - min(256.0, max(0.0, level))
    # A threshold of 256 inverts nothing; torchvision rejects thresholds above the dtype's maximum.
    return img if threshold > 255 else F.solarize(img, threshold)


def _rotate(img: ImageT, level: float) -> ImageT:
    return F.rotate(img, level, interpolation=_GEOMETRY_INTERPOLATION, fill=FILL)


def _affine(img: ImageT, translate: list[int], shear: list[float]) -> ImageT:
    # Shear about the top-left corner: PIL's `Image.transform` convention, which UDA and torchvision use.
    return F.affine(
        img, angle=0.0, translate=translate, scale=1.0, shear=shear,
        interpolation=_GEOMETRY_INTERPOLATION, fill=FILL, center=[0, 0],
    )  # fmt: skip


def _shear_x(img: ImageT, level: float) -> ImageT:
    return _affine(img, [0, 0], [math.degrees(math.atan(level)), 0.0])


def _shear_y(img: ImageT, level: float) -> ImageT:
    return _affine(img, [0, 0], [0.0, math.degrees(math.atan(level))])


def _translate_x(img: ImageT, level: float) -> ImageT:
    return _affine(img, [round(level * F.get_size(img)[1]), 0], [0.0, 0.0])


def _translate_y(img: ImageT, level: float) -> ImageT:
    return _affine(img, [0, round(level * F.get_size(img)[0])], [0.0, 0.0])


def _to_tensor(img: Image.Image | torch.Tensor) -> torch.Tensor:
    return F.pil_to_tensor(img) if isinstance(img, Image.Image) else img


def _like(x: torch.Tensor, reference: ImageT) -> ImageT:
    return F.to_pil_image(x, mode=reference.mode) if isinstance(reference, Image.Image) else x


def sample_pairing(img: ImageT, pair: Image.Image | torch.Tensor, weight: float) -> ImageT:
    """SamplePairing (Inoue, arXiv:1801.02929; AutoAugment's op): (1 - weight) * img + weight * pair.

    The partner is converted to the image's type and mode, and resized to its size if it differs. Every
    output pixel lies between the two images' pixels (the blend is convex, then rounded).
    """
    weight = min(1.0, max(0.0, weight))
    if isinstance(img, Image.Image) and isinstance(pair, Image.Image) and pair.mode != img.mode:
        pair = pair.convert(img.mode)
    a, b = _to_tensor(img), _to_tensor(pair)
    if b.shape[-2:] != a.shape[-2:]:
        b = F.resize(b, list(a.shape[-2:]), antialias=True)
    if b.shape != a.shape or b.dtype != a.dtype:
        raise ValueError(f"partner {tuple(b.shape)} {b.dtype} does not fit image {tuple(a.shape)} {a.dtype}")
    out = torch.lerp(a.float(), b.float(), weight).round_().to(a.dtype)
    return _like(out, img)


class Op(NamedTuple):
    """One RandAugment operation: `fn(image, level)`, its level at M=10, and whether a random sign applies."""

    fn: Callable
    max_level: float
    signed: bool


OPS: dict[str, Op] = {
    "AutoContrast": Op(lambda img, level: F.autocontrast(img), 0.0, False),
    "Brightness": Op(_enhance(F.adjust_brightness), 0.9, True),
    "Color": Op(_enhance(F.adjust_saturation), 0.9, True),  # PIL's ImageEnhance.Color is a saturation blend
    "Contrast": Op(_enhance(F.adjust_contrast), 0.9, True),
    "Equalize": Op(lambda img, level: F.equalize(img), 0.0, False),
    "Invert": Op(lambda img, level: F.invert(img), 0.0, False),
    "Sharpness": Op(_enhance(F.adjust_sharpness), 0.9, True),
    "Posterize": Op(_posterize, 4.0, False),
    "SamplePairing": Op(sample_pairing, 0.4, False),  # fn(image, pair, level): see RandAugment.apply_ops
    "Solarize": Op(_solarize, 256.0, False),
    "Rotate": Op(_rotate, 30.0, True),
    "ShearX": Op(_shear_x, 0.3, True),
    "ShearY": Op(_shear_y, 0.3, True),
    "TranslateX": Op(_translate_x, 0.3, True),
    "TranslateY": Op(_translate_y, 0.3, True),
}


# ---------------------------------------------------------------------------------------------------------
# Randomness


def augment_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of (seed, *keys), e.g. (seed, epoch, index): stable across runs,
    processes and Python's hash randomization, and unrelated streams for neighbouring keys."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def _resolve(generator: torch.Generator | None) -> torch.Generator:
    return torch.default_generator if generator is None else generator


def _randint(high: int, generator: torch.Generator) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator))


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _check_image(img: object) -> None:
    if isinstance(img, torch.Tensor):
        if img.dtype != torch.uint8 or img.ndim != 3:
            raise TypeError(f"expected a uint8 CHW tensor, got {img.dtype} of shape {tuple(img.shape)}")
    elif not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 CHW tensor, got {type(img).__name__}")


# ---------------------------------------------------------------------------------------------------------
# RandAugment


class SampledOp(NamedTuple):
    """An op drawn by `RandAugment.sample_ops`, with its signed level (see the module docstring)."""

    name: str
    level: float


class RandAugment:
    """RandAugment (Cubuk et al., arXiv:1909.13719) over one of the paper's op sets (Table 5).

    Each call draws `num_ops` ops uniformly with replacement from `op_set` and applies each, in order, at
    `magnitude` (0-10 scale, see the module docstring). `sample_ops` and `apply_ops` split a call in two, so
    that tests and logs can see which ops ran.

    Args:
        op_set: a key of `OP_SETS` ("cifar10", "imagenet", "svhn") or a sequence of names from `OPS`.
        num_ops: N, ops per image.
        magnitude: M, shared by all ops.
        max_translate: translation at M=10, as a fraction of the image side.
        pair_sampler: `pair_sampler(generator)` returns a SamplePairing partner (PIL image or uint8 CHW
            tensor); called only when SamplePairing is drawn, with the call's generator. Must be picklable
            for DataLoader workers (a module-level function or a small class, not a lambda).
    """

    def __init__(
        self,
        op_set: str | Sequence[str],
        num_ops: int,
        magnitude: float,
        max_translate: float = 0.3,
        pair_sampler: PairSampler | None = None,
    ) -> None:
        if isinstance(op_set, str):
            if op_set not in OP_SETS:
                raise ValueError(f"unknown op set {op_set!r}; known: {sorted(OP_SETS)}")
            op_set = OP_SETS[op_set]
        unknown = [name for name in op_set if name not in OPS]
        if unknown or not op_set:
            raise ValueError(f"unknown ops {unknown} (or an empty set); known: {sorted(OPS)}")
        if num_ops < 0 or magnitude < 0 or max_translate < 0:
            raise ValueError(f"negative num_ops, magnitude or max_translate: {num_ops, magnitude, max_translate}")
        self.ops = tuple(op_set)
        self.num_ops = num_ops
        self.magnitude = float(magnitude)
        self.max_translate = float(max_translate)
        self.pair_sampler = pair_sampler

    @property
    def needs_pair(self) -> bool:
        return "SamplePairing" in self.ops

    def sample_ops(self, generator: torch.Generator | None = None) -> list[SampledOp]:
        """Draw the ops of one call: names uniformly with replacement, then a sign per symmetric op."""
        generator = _resolve(generator)
        indices = torch.randint(len(self.ops), (self.num_ops,), generator=generator).tolist()
        sampled = []
        for i in indices:
            name = self.ops[i]
            op = OPS[name]
            max_level = self.max_translate if name in ("TranslateX", "TranslateY") else op.max_level
            level = self.magnitude / MAX_MAGNITUDE * max_level
            if op.signed and _randint(2, generator):
                level = -level
            sampled.append(SampledOp(name, level))
        return sampled

    def apply_ops(
        self, img: ImageT, ops: Sequence[SampledOp], pair: Image.Image | torch.Tensor | None = None
    ) -> ImageT:
        """Apply `ops` in order; `pair` is SamplePairing's partner (required only if it is among `ops`)."""
        for name, level in ops:
            if name == "SamplePairing":
                if pair is None:
                    raise ValueError("SamplePairing drawn without a partner image")
                img = sample_pairing(img, pair, level)
            else:
                img = OPS[name].fn(img, level)
        return img

    def __call__(
        self,
        img: ImageT,
        generator: torch.Generator | None = None,
        pair: Image.Image | torch.Tensor | None = None,
    ) -> ImageT:
        _check_image(img)
        if self.needs_pair and pair is None and self.pair_sampler is None:
            raise ValueError(
                "this op set contains SamplePairing: pass pair= to each call or pair_sampler= at construction"
            )
        generator = _resolve(generator)
        ops = self.sample_ops(generator)
        if pair is None and any(op.name == "SamplePairing" for op in ops):
            pair = self.pair_sampler(generator)
        return self.apply_ops(img, ops, pair)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(ops={list(self.ops)}, num_ops={self.num_ops}, "
            f"magnitude={self.magnitude}, max_translate={self.max_translate}, "
            f"pair_sampler={self.pair_sampler!r})"
        )


# ---------------------------------------------------------------------------------------------------------
# Weak views and Cutout


class CropFlip(NamedTuple):
    """A weak view's parameters: a crop box (in the padded image for `PadCropFlip`) and a flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


class PadCropFlip:
    """Random `size` x `size` crop of the image reflect-padded by `padding` on each side, then a horizontal
    flip with probability 1/2 if `flip` (CIFAR-10; SVHN without flips). Images of another size are first
    resized (bicubic) to `size`, as MPL's TF code does for image_size != 32."""

    def __init__(self, size: int, padding: int, flip: bool) -> None:
        self.size, self.padding, self.flip = size, padding, flip

    def sample_params(self, generator: torch.Generator | None = None) -> CropFlip:
        generator = _resolve(generator)
        top = _randint(2 * self.padding + 1, generator)
        left = _randint(2 * self.padding + 1, generator)
        flip = self.flip and bool(_randint(2, generator))
        return CropFlip(top, left, self.size, self.size, flip)

    def apply(self, img: ImageT, params: CropFlip) -> ImageT:
        if F.get_size(img) != [self.size, self.size]:
            img = F.resize(img, [self.size] * 2, interpolation=InterpolationMode.BICUBIC, antialias=True)
        if self.padding:
            img = F.pad(img, [self.padding], padding_mode="reflect")
        img = F.crop(img, params.top, params.left, params.height, params.width)
        return F.horizontal_flip(img) if params.flip else img

    def __call__(self, img: ImageT, generator: torch.Generator | None = None) -> ImageT:
        _check_image(img)
        return self.apply(img, self.sample_params(generator))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, padding={self.padding}, flip={self.flip})"


class ResizedCropFlip:
    """Inception-style random-resized crop to `size` (area 8-100%, aspect 3/4-4/3, bicubic, as MPL's TF
    ImageNet input) and a horizontal flip with probability 1/2. Sampling follows torchvision's
    `RandomResizedCrop.get_params` (10 tries, then a center crop), with the generator."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip: bool = True,
    ) -> None:
        self.size, self.scale, self.ratio, self.flip = size, scale, ratio, flip

    def sample_params(
        self, img: Image.Image | torch.Tensor, generator: torch.Generator | None = None
    ) -> CropFlip:
        generator = _resolve(generator)
        height, width = F.get_size(img)
        area = height * width
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        box = None
        for _ in range(10):
            target_area = area * _uniform(*self.scale, generator)
            aspect = math.exp(_uniform(*log_ratio, generator))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                box = (_randint(height - h + 1, generator), _randint(width - w + 1, generator), h, w)
                break
        if box is None:  # fallback: the whole image, its aspect clamped to the range, centered
            aspect = width / height
            if aspect < min(self.ratio):
                w, h = width, round(width / min(self.ratio))
            elif aspect > max(self.ratio):
                w, h = round(height * max(self.ratio)), height
            else:
                w, h = width, height
            box = ((height - h) // 2, (width - w) // 2, h, w)
        flip = self.flip and bool(_randint(2, generator))
        return CropFlip(*box, flip)

    def apply(self, img: ImageT, params: CropFlip) -> ImageT:
        img = F.resized_crop(
            img, params.top, params.left, params.height, params.width, [self.size, self.size],
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )  # fmt: skip
        return F.horizontal_flip(img) if params.flip else img

    def __call__(self, img: ImageT, generator: torch.Generator | None = None) -> ImageT:
        _check_image(img)
        return self.apply(img, self.sample_params(img, generator))

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(size={self.size}, scale={self.scale}, ratio={self.ratio}, flip={self.flip})"


class Cutout:
    """Cutout (DeVries & Taylor, arXiv:1708.04552): a `size` x `size` square of gray `fill`, centered on a
    uniformly drawn pixel and clipped at the borders (MPL's TF `augment.cutout`)."""

    def __init__(self, size: int, fill: int = FILL) -> None:
        self.size, self.fill = size, fill

    def __call__(self, img: ImageT, generator: torch.Generator | None = None) -> ImageT:
        _check_image(img)
        generator = _resolve(generator)
        height, width = F.get_size(img)
        cy, cx = _randint(height, generator), _randint(width, generator)
        y0, x0 = max(0, cy - self.size // 2), max(0, cx - self.size // 2)
        y1, x1 = min(height, cy - self.size // 2 + self.size), min(width, cx - self.size // 2 + self.size)
        if isinstance(img, Image.Image):
            out = img.copy()
            out.paste((self.fill,) * len(img.getbands()), (x0, y0, x1, y1))
            return out
        out = img.clone()
        out[:, y0:y1, x0:x1] = self.fill
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, fill={self.fill})"


# ---------------------------------------------------------------------------------------------------------
# The views the trainer uses


def _check_dataset(dataset: str) -> None:
    if dataset not in OP_SETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {sorted(OP_SETS)}")


def weak_transform(dataset: str, image_size: int) -> PadCropFlip | ResizedCropFlip:
    """The weak view of UDA / FixMatch / MPL: flip and translate.

    CIFAR-10: reflect-pad by 12.5% of the side (4 px at 32), random crop back, horizontal flip. Reflect
    padding as FixMatch and the PyTorch MPL port; MPL's TF code pads with gray 128 instead.
    SVHN: the same without the flip (mirrored digits are other digits or none).
    ImageNet: random-resized crop to `image_size` and horizontal flip (a pad-and-crop of a full-size photo
    would not be the ImageNet baselines' input).
    """
    _check_dataset(dataset)
    if dataset == "imagenet":
        return ResizedCropFlip(image_size)
    return PadCropFlip(image_size, padding=round(image_size / 8), flip=dataset != "svhn")


class _WeakPartner:
    """A pair sampler whose partner goes through the weak view (with the same generator) before blending."""

    def __init__(self, sampler: PairSampler, weak: Callable) -> None:
        self.sampler, self.weak = sampler, weak

    def __call__(self, generator: torch.Generator) -> Image.Image | torch.Tensor:
        return self.weak(self.sampler(generator), generator)


class StrongTransform:
    """weak -> RandAugment -> Cutout (optional), all from one generator, in that order."""

    def __init__(
        self, weak: PadCropFlip | ResizedCropFlip, randaugment: RandAugment, cutout: Cutout | None
    ) -> None:
        self.weak, self.randaugment, self.cutout = weak, randaugment, cutout

    def __call__(
        self,
        img: ImageT,
        generator: torch.Generator | None = None,
        pair: Image.Image | torch.Tensor | None = None,
    ) -> ImageT:
        """`pair`, if given, is SamplePairing's raw partner; it goes through the weak view too."""
        generator = _resolve(generator)
        img = self.weak(img, generator)
        if pair is not None:
            pair = self.weak(pair, generator)
        img = self.randaugment(img, generator, pair=pair)
        return img if self.cutout is None else self.cutout(img, generator)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(weak={self.weak!r}, randaugment={self.randaugment!r}, cutout={self.cutout!r})"


def strong_transform(
    dataset: str,
    image_size: int,
    num_ops: int = 2,
    magnitude: float = 10.0,
    cutout: bool | None = None,
    max_translate: float = 0.3,
    pair_sampler: PairSampler | None = None,
) -> StrongTransform:
    """The strong view of UDA / MPL: the weak view, then RandAugment over the dataset's Table 5 op set, then
    Cutout.

    `cutout=None` means the paper's code: a square of half the side (16 px at 32) for CIFAR-10 and SVHN, as
    MPL's TF CIFAR input (`cutout(pad_size=image_size // 4)` after RandAugment) and UDA / FixMatch; none
    for ImageNet, as MPL's TF ImageNet input. M=10 is the top of the standard scale (MPL's TF code
    extrapolates to 17). CIFAR-10 and ImageNet sets contain SamplePairing: give `pair_sampler` (raw
    examples; they are weak-viewed here) or pass `pair=` to each call.
    """
    _check_dataset(dataset)
    weak = weak_transform(dataset, image_size)
    sampler = None if pair_sampler is None else _WeakPartner(pair_sampler, weak)
    randaugment = RandAugment(dataset, num_ops, magnitude, max_translate=max_translate, pair_sampler=sampler)
    if cutout is None:
        cutout = dataset != "imagenet"
    return StrongTransform(weak, randaugment, Cutout(image_size // 2) if cutout else None)
