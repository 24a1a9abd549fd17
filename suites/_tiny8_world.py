"""The procedural world of the embedded ``tiny8`` suite: its eight tasks' classes, how their images are drawn,
their seeded splits and prompts, and the pretraining corpus (see :mod:`suites.tiny8` for the build).

Images are 16x16 RGB (or the preset's size) drawn from a ``torch.Generator``; ``canonical=True`` draws the clean
white-on-black, centred renderings whose pretrained embeddings make the zero-shot heads. The two digit tasks draw
scikit-learn's bundled ``load_digits()`` glyphs, partitioned once so a glyph appears in one split only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from suites._clip_classification import DataSplit, derived_seed

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond")
TEXTURES = (
    "horizontal",
    "diagonal_rising",
    "vertical",
    "diagonal_falling",
    "checkered",
    "dotted",
    "grid",
    "blotchy",
)
HUES = {  # class name -> hue in degrees
    "red": 0.0,
    "orange": 30.0,
    "yellow": 57.0,
    "green": 120.0,
    "cyan": 180.0,
    "blue": 228.0,
    "purple": 275.0,
    "pink": 320.0,
}
COUNTS = ("one", "two", "three", "four", "five", "six")
POSITIONS = (
    "top_left",
    "top",
    "top_right",
    "left",
    "centre",
    "right",
    "bottom_left",
    "bottom",
    "bottom_right",
)
SIZE_BANDS = {"tiny": (1.4, 2.1), "small": (2.7, 3.4), "medium": (4.0, 4.7), "large": (5.4, 6.3)}  # radii, px
DIGITS = tuple(str(d) for d in range(10))

TASK_CLASSES: dict[str, tuple[str, ...]] = {
    "digits": DIGITS,
    "noisy_digits": DIGITS,
    "shapes": SHAPES,
    "textures": TEXTURES,
    "colours": tuple(HUES),
    "counting": COUNTS,
    "position": POSITIONS,
    "sizes": tuple(SIZE_BANDS),
}
TASKS = tuple(TASK_CLASSES)

# Fixed partition of the 1797 load_digits glyphs: a glyph appears in one split only, for both digit tasks.
DIGIT_POOL_SIZES = {"test": 450, "validation": 180, "unlabeled": 270}  # train gets the remaining 897

PIXEL_MEAN, PIXEL_STD = 0.5, 0.25


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _choice(generator: torch.Generator, n: int, options: int) -> Tensor:
    return torch.randint(options, (n,), generator=generator)


def _pixel_grid(size: int) -> tuple[Tensor, Tensor]:
    """x and y coordinates of pixel centres, each [1, size, size]."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x[None], y[None]


def _edge(signed_inside: Tensor) -> Tensor:
    """Coverage from a distance-like quantity, positive inside: a one-pixel linear ramp (antialiasing)."""
    return (signed_inside + 0.5).clamp(0.0, 1.0)


def shape_coverage(kind: Tensor, cx: Tensor, cy: Tensor, radius: Tensor, size: int) -> Tensor:
    """Soft coverage [n, size, size] of shapes of kind ``kind`` (index into SHAPES) and comparable area."""
    x, y = _pixel_grid(size)
    dx, dy = (x - cx[:, None, None]).abs(), y - cy[:, None, None]
    r = radius[:, None, None]
    distance = torch.sqrt(dx**2 + dy**2)
    arm = (r / 3).clamp(min=0.8)
    coverages = torch.stack(
        [
            _edge(r - distance),
            _edge(0.85 * r - torch.maximum(dx, dy.abs())),
            torch.minimum(_edge(0.75 * r - dy), _edge(0.6 * (dy + 1.1 * r) - dx)),
            torch.maximum(
                torch.minimum(_edge(arm - dx), _edge(r - dy.abs())),
                torch.minimum(_edge(arm - dy.abs()), _edge(r - dx)),
            ),
            torch.minimum(_edge(r - distance), _edge(distance - 0.5 * r)),
            _edge(1.2 * r - (dx + dy.abs())),
        ]
    )  # [num_shapes, n, size, size]
    return coverages.gather(0, kind[None, :, None, None].expand(1, -1, size, size))[0]


def hsv_to_rgb(hue: Tensor, saturation: Tensor, value: Tensor) -> Tensor:
    """Colours [n, 3] from hue in [0, 1) and saturation, value in [0, 1]."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + hue[:, None] * 6.0) % 6.0
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return value[:, None] * (1.0 - saturation[:, None] * ramp)


def random_colour(
    generator: torch.Generator, n: int, saturation: tuple[float, float], value: tuple[float, float]
) -> Tensor:
    return hsv_to_rgb(
        torch.rand(n, generator=generator),
        _uniform(generator, n, *saturation),
        _uniform(generator, n, *value),
    )


def paint(background: Tensor, foreground: Tensor, coverage: Tensor) -> Tensor:
    """Blend a background (colours [n, 3] or images [n, 3, H, W]) with foreground colours by coverage."""
    if background.dim() == 2:
        background = background[:, :, None, None]
    coverage = coverage[:, None]
    return background * (1.0 - coverage) + foreground[:, :, None, None] * coverage


def add_noise(images: Tensor, generator: torch.Generator, std: float) -> Tensor:
    return (images + std * torch.randn(images.shape, generator=generator)).clamp(0.0, 1.0)


def _canonical_colours(n: int) -> tuple[Tensor, Tensor]:
    """White on black: the style of every zero-shot "prompt" rendering."""
    return torch.zeros(n, 3), torch.ones(n, 3)


def _random_centre(generator: torch.Generator, radius: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Centres that keep a shape of ``radius`` inside the image."""
    margin = radius + 0.5
    span = (size - 2 * margin).clamp(min=0.0)
    return margin + span * torch.rand(radius.shape, generator=generator), margin + span * torch.rand(
        radius.shape, generator=generator
    )


def gradient_background(generator: torch.Generator, n: int, size: int, value: tuple[float, float]) -> Tensor:
    """A linear blend between two random colours along a random direction, [n, 3, size, size]."""
    x, y = _pixel_grid(size)
    angle = _uniform(generator, n, 0.0, 2 * math.pi)[:, None, None]
    ramp = ((x - size / 2) * torch.cos(angle) + (y - size / 2) * torch.sin(angle)) / size + 0.5
    first = random_colour(generator, n, (0.2, 0.8), value)
    second = random_colour(generator, n, (0.2, 0.8), value)
    return paint(first, second, ramp.clamp(0.0, 1.0))


def blotches(generator: torch.Generator, n: int, size: int) -> Tensor:
    """Smooth random blotches in [0, 1], [n, size, size] (bicubic upsampling of a 4x4 random grid)."""
    coarse = torch.rand((n, 1, 4, 4), generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0].clamp(0.0, 1.0)


# Every task has its own look (background, palette, noise), as the real vit8 datasets do; the zero-shot
# "prompts" of all tasks share one neutral look instead (white on black, centred).


def _shape_on(
    generator: torch.Generator, style: str, shape: Tensor, cx: Tensor, cy: Tensor, radius: Tensor, size: int
) -> Tensor:
    """A shape on a task's background ``style``: light, gradient or muted."""
    n = shape.numel()
    coverage = shape_coverage(shape, cx, cy, radius, size)
    if style == "light":  # dark saturated shapes on pale backgrounds, like road signs
        background = random_colour(generator, n, (0.0, 0.3), (0.75, 1.0))
        foreground = random_colour(generator, n, (0.5, 1.0), (0.15, 0.6))
        return add_noise(paint(background, foreground, coverage), generator, 0.03)
    if style == "gradient":
        background = gradient_background(generator, n, size, (0.15, 0.5))
        foreground = random_colour(generator, n, (0.3, 1.0), (0.9, 1.0))
        return add_noise(paint(background, foreground, coverage), generator, 0.03)
    background = random_colour(generator, n, (0.2, 0.6), (0.2, 0.45))
    foreground = random_colour(generator, n, (0.3, 1.0), (0.8, 1.0))
    return add_noise(paint(background, foreground, coverage), generator, 0.04)


def draw_objects(generator: torch.Generator, labels: Tensor, size: int, canonical: bool) -> Tensor:
    """``shapes``: one shape of class ``labels`` of random size and place, dark on a pale background."""
    n = labels.numel()
    if canonical:
        radius = torch.linspace(3.8, 5.2, n) if n > 1 else torch.full((1,), 4.5)
        centre = torch.full((n,), size / 2)
        return paint(*_canonical_colours(n), shape_coverage(labels, centre, centre, radius, size))
    radius = _uniform(generator, n, 3.6, 6.2)
    cx, cy = _random_centre(generator, radius, size)
    return _shape_on(generator, "light", labels, cx, cy, radius, size)


def texture_pattern(kind: Tensor, generator: torch.Generator, size: int, canonical: bool) -> Tensor:
    """``textures``: a pattern in [0, 1], [n, size, size], of class ``kind`` (index into TEXTURES)."""
    n = kind.numel()
    x, y = _pixel_grid(size)
    if canonical:
        period = torch.linspace(3.5, 5.5, n) if n > 1 else torch.full((1,), 4.5)
        phase_u = phase_v = torch.zeros(n)
        tilt = torch.zeros(n)
    else:
        period = _uniform(generator, n, 3.0, 6.0)
        phase_u, phase_v = _uniform(generator, n, 0, 2 * math.pi), _uniform(generator, n, 0, 2 * math.pi)
        tilt = _uniform(generator, n, -0.17, 0.17)  # about +-10 degrees
    stripe_angle = torch.tensor([math.pi / 2, -math.pi / 4, 0.0, math.pi / 4])  # normal direction of stripes
    angle = torch.where(kind < 4, stripe_angle[kind.clamp(max=3)], torch.zeros(n)) + tilt
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u = (x * cos + y * sin) * (2 * math.pi / period[:, None, None]) + phase_u[:, None, None]
    v = (-x * sin + y * cos) * (2 * math.pi / period[:, None, None]) + phase_v[:, None, None]
    sharp = 3.0
    stripes = torch.sigmoid(sharp * torch.sin(u))
    checkered = torch.sigmoid(sharp * torch.sin(u) * torch.sin(v) * 2)
    dotted = torch.sigmoid(4.0 * (torch.cos(u) + torch.cos(v) - 1.0))
    grid = torch.maximum(torch.sigmoid(6.0 * (torch.cos(u) - 0.7)), torch.sigmoid(6.0 * (torch.cos(v) - 0.7)))
    if canonical:
        coarse = torch.arange(16, dtype=torch.float32).remainder(3).div(2).view(1, 1, 4, 4).expand(n, 1, 4, 4)
        blotchy = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[:, 0].clamp(
            0, 1
        )
    else:
        blotchy = blotches(generator, n, size)
    patterns = torch.stack([stripes, stripes, stripes, stripes, checkered, dotted, grid, blotchy])
    return patterns.gather(0, kind[None, :, None, None].expand(1, -1, size, size))[0]


def draw_textures(generator: torch.Generator, labels: Tensor, size: int, canonical: bool) -> Tensor:
    n = labels.numel()
    pattern = texture_pattern(labels, generator, size, canonical)
    if canonical:
        background, foreground = _canonical_colours(n)
        return paint(background, foreground, pattern)
    first = random_colour(generator, n, (0.0, 1.0), (0.0, 0.4))
    second = random_colour(generator, n, (0.0, 1.0), (0.6, 1.0))
    swap = torch.rand(n, generator=generator) < 0.5
    background = torch.where(swap[:, None], second, first)
    foreground = torch.where(swap[:, None], first, second)
    return add_noise(paint(background, foreground, pattern), generator, 0.04)


def draw_colours(generator: torch.Generator, labels: Tensor, size: int, canonical: bool) -> Tensor:
    """``colours``: a full-frame blotchy terrain whose hue is the class (the EuroSAT analogue)."""
    n = labels.numel()
    hue_centres = torch.tensor(list(HUES.values())) / 360.0
    if canonical:
        shape, radius = torch.arange(n) % len(SHAPES), torch.full((n,), 5.0)
        centre = torch.full((n,), size / 2)
        colour = hsv_to_rgb(hue_centres[labels], torch.ones(n), torch.ones(n))
        return paint(torch.zeros(n, 3), colour, shape_coverage(shape, centre, centre, radius, size))
    hue = (hue_centres[labels] + _uniform(generator, n, -0.02, 0.02)) % 1.0
    colour = hsv_to_rgb(hue, _uniform(generator, n, 0.55, 1.0), torch.ones(n))
    brightness = 0.35 + 0.65 * blotches(generator, n, size)
    return add_noise(colour[:, :, None, None] * brightness[:, None], generator, 0.03)


def dots_coverage(generator: torch.Generator, counts: Tensor, size: int, canonical: bool) -> Tensor:
    """``counts[i]`` separated dots: each in its own cell of a 4x4 grid, so they never touch."""
    n, cells = counts.numel(), 4
    cell = size / cells
    order = torch.rand((n, cells * cells), generator=generator).argsort(dim=1).argsort(dim=1)
    chosen = order < counts[:, None]  # [n, 16]: a random subset of counts[i] cells
    centres = (torch.arange(cells, dtype=torch.float32) + 0.5) * cell
    cy, cx = (c.reshape(-1) for c in torch.meshgrid(centres, centres, indexing="ij"))
    radius = torch.full((n,), 1.25) if canonical else _uniform(generator, n, 1.0, 1.45)
    if not canonical:
        jitter = (cell / 2 - radius - 0.3).clamp(min=0.0)[:, None]
        cx = cx[None] + jitter * (2 * torch.rand((n, cells * cells), generator=generator) - 1)
        cy = cy[None] + jitter * (2 * torch.rand((n, cells * cells), generator=generator) - 1)
    else:
        cx, cy = cx[None].expand(n, -1), cy[None].expand(n, -1)
    x, y = _pixel_grid(size)
    distance = torch.sqrt((x[None] - cx[..., None, None]) ** 2 + (y[None] - cy[..., None, None]) ** 2)
    coverage = _edge(radius[:, None, None, None] - distance) * chosen[..., None, None]
    return coverage.amax(dim=1)


def draw_counting(generator: torch.Generator, labels: Tensor, size: int, canonical: bool) -> Tensor:
    """``counting``: 1-6 pale warm dots on a dark blue night-sky background."""
    n = labels.numel()
    coverage = dots_coverage(generator, labels + 1, size, canonical)
    if canonical:
        return paint(*_canonical_colours(n), coverage)
    sky = hsv_to_rgb(
        _uniform(generator, n, 0.55, 0.72),
        _uniform(generator, n, 0.4, 0.9),
        _uniform(generator, n, 0.1, 0.35),
    )
    stars = hsv_to_rgb(
        _uniform(generator, n, 0.08, 0.17),
        _uniform(generator, n, 0.0, 0.6),
        _uniform(generator, n, 0.85, 1.0),
    )
    return add_noise(paint(sky, stars, coverage), generator, 0.03)


def draw_position(generator: torch.Generator, labels: Tensor, size: int, canonical: bool) -> Tensor:
    """``position``: a small bright shape in the 3x3 grid cell of the class, on a gradient background."""
    n = labels.numel()
    cell = size / 3
    row, column = labels // 3, labels % 3
    if canonical:
        shape, radius = torch.arange(n) % len(SHAPES), torch.full((n,), 2.0)
        coverage = shape_coverage(shape, (column + 0.5) * cell, (row + 0.5) * cell, radius, size)
        return paint(*_canonical_colours(n), coverage)
    shape, radius = _choice(generator, n, len(SHAPES)), _uniform(generator, n, 1.4, 2.2)
    room = (cell / 2 - radius - 0.1).clamp(min=0.0)
    cx = (column + 0.5) * cell + room * (2 * torch.rand(n, generator=generator) - 1)
    cy = (row + 0.5) * cell + room * (2 * torch.rand(n, generator=generator) - 1)
    return _shape_on(generator, "gradient", shape, cx, cy, radius, size)


def draw_sizes(generator: torch.Generator, labels: Tensor, size: int, canonical: bool) -> Tensor:
    """``sizes``: a shape whose radius lies in the class's band, anywhere it fits, on a muted background."""
    n = labels.numel()
    bands = torch.tensor(list(SIZE_BANDS.values()))
    low, high = bands[labels, 0], bands[labels, 1]
    if canonical:
        shape, centre = torch.arange(n) % len(SHAPES), torch.full((n,), size / 2)
        return paint(*_canonical_colours(n), shape_coverage(shape, centre, centre, (low + high) / 2, size))
    shape = _choice(generator, n, len(SHAPES))
    radius = low + (high - low) * torch.rand(n, generator=generator)
    cx, cy = _random_centre(generator, radius, size)
    return _shape_on(generator, "muted", shape, cx, cy, radius, size)


def place_glyphs(
    glyphs: Tensor, size: int, scale: Tensor, shift_x: Tensor, shift_y: Tensor, rotation: Tensor
) -> Tensor:
    """Warp 8x8 glyphs [n, 8, 8] in [0, 1] onto [n, size, size]; shifts are in pixels of the output."""
    n = glyphs.shape[0]
    fill = 0.78  # fraction of the image an unscaled glyph spans
    zoom = 1.0 / (fill * scale)
    cos, sin = torch.cos(rotation) * zoom, torch.sin(rotation) * zoom
    to_unit = 2.0 / size
    theta = torch.stack(
        [
            torch.stack([cos, -sin, -(cos * shift_x - sin * shift_y) * to_unit], dim=1),
            torch.stack([sin, cos, -(sin * shift_x + cos * shift_y) * to_unit], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    return F.grid_sample(glyphs[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)[
        :, 0
    ]


def draw_digits(glyphs: Tensor, generator: torch.Generator, size: int, canonical: bool) -> Tensor:
    """``digits``: clean light glyphs on a dark background with small shifts (the MNIST analogue)."""
    n = glyphs.shape[0]
    if canonical:
        zero = torch.zeros(n)
        return paint(*_canonical_colours(n), place_glyphs(glyphs, size, torch.ones(n), zero, zero, zero))
    coverage = place_glyphs(
        glyphs,
        size,
        _uniform(generator, n, 0.95, 1.05),
        _uniform(generator, n, -0.75, 0.75),
        _uniform(generator, n, -0.75, 0.75),
        _uniform(generator, n, -0.05, 0.05),
    )
    background = random_colour(generator, n, (0.0, 0.1), (0.0, 0.15))
    foreground = random_colour(generator, n, (0.0, 0.1), (0.8, 1.0))
    return add_noise(paint(background, foreground, coverage), generator, 0.02)


def draw_noisy_digits(glyphs: Tensor, distractors: Tensor, generator: torch.Generator, size: int) -> Tensor:
    """``noisy_digits``: any colours (often inverted), neighbours cut by the border, noise (SVHN-like)."""
    n = glyphs.shape[0]
    scale = _uniform(generator, n, 0.9, 1.05)
    shift_x, shift_y = _uniform(generator, n, -1.0, 1.0), _uniform(generator, n, -1.0, 1.0)
    rotation = _uniform(generator, n, -0.1, 0.1)
    coverage = place_glyphs(glyphs, size, scale, shift_x, shift_y, rotation)
    for side, distractor in zip((-1.0, 1.0), distractors, strict=False):
        present = (torch.rand(n, generator=generator) < 0.5).float()
        offset = side * size * _uniform(generator, n, 0.72, 0.85)
        neighbour = place_glyphs(distractor, size, scale, shift_x + offset, shift_y, rotation)
        coverage = torch.maximum(coverage, neighbour * present[:, None, None])
    bright = random_colour(generator, n, (0.0, 1.0), (0.6, 1.0))
    dark = random_colour(generator, n, (0.0, 1.0), (0.0, 0.4))
    inverted = torch.rand(n, generator=generator) < 0.5
    background = torch.where(inverted[:, None], bright, dark)
    foreground = torch.where(inverted[:, None], dark, bright)
    return add_noise(paint(background, foreground, coverage), generator, 0.05)


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------


def to_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def prepare_images(images: Tensor) -> Tensor:
    """Stored uint8 images -> normalised float encoder inputs."""
    return (images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


def load_digit_pools(build_seed: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The load_digits glyphs (in [0, 1], [m, 8, 8]) and labels, partitioned into disjoint per-split pools."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    glyphs = torch.tensor(bunch.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(
        len(labels), generator=torch.Generator().manual_seed(derived_seed(build_seed, "pools"))
    )
    pools, start = {}, 0
    for split in ("test", "validation", "unlabeled"):
        chosen = order[start : start + DIGIT_POOL_SIZES[split]]
        pools[split] = (glyphs[chosen], labels[chosen])
        start += DIGIT_POOL_SIZES[split]
    pools["train"] = (glyphs[order[start:]], labels[order[start:]])
    return pools


def _cycle_indices(generator: torch.Generator, n: int, pool: int) -> Tensor:
    """``n`` pool indices using every pool item as evenly as possible, in random order."""
    repeats = torch.cat([torch.randperm(pool, generator=generator) for _ in range(-(-n // pool))])
    return repeats[:n]


def make_task_split(
    task: str, n: int, generator: torch.Generator, size: int, digit_pool: tuple[Tensor, Tensor]
) -> DataSplit:
    """``n`` examples of ``task`` in random order: balanced classes, digits as their glyph pool has them."""
    num_classes = len(TASK_CLASSES[task])
    if task in ("digits", "noisy_digits"):
        glyphs, glyph_labels = digit_pool
        indices = _cycle_indices(generator, n, len(glyph_labels))
        if task == "digits":
            images = draw_digits(glyphs[indices], generator, size, canonical=False)
        else:
            distractors = [glyphs[_cycle_indices(generator, n, len(glyph_labels))] for _ in range(2)]
            images = draw_noisy_digits(glyphs[indices], distractors, generator, size)
        return DataSplit(to_uint8(images), glyph_labels[indices].clone())
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    images = DRAWERS[task](generator, labels, size, False)
    return DataSplit(to_uint8(images), labels)


DRAWERS: dict[str, Callable[[torch.Generator, Tensor, int, bool], Tensor]] = {
    "shapes": draw_objects,
    "textures": draw_textures,
    "colours": draw_colours,
    "counting": draw_counting,
    "position": draw_position,
    "sizes": draw_sizes,
}


def make_prompts(
    task: str, prompts_per_class: int, size: int, digit_pool: tuple[Tensor, Tensor], build_seed: int
) -> list[Tensor]:
    """Per class, a batch of clean canonical renderings (the analogue of CLIP's prompt templates)."""
    generator = torch.Generator().manual_seed(derived_seed(build_seed, "prompts", task))
    prompts = []
    for label in range(len(TASK_CLASSES[task])):
        if task in ("digits", "noisy_digits"):
            glyphs, glyph_labels = digit_pool
            examples = glyphs[glyph_labels == label][:prompts_per_class]
            images = draw_digits(examples, generator, size, canonical=True)
        else:
            images = DRAWERS[task](generator, torch.full((prompts_per_class,), label), size, True)
        prompts.append(prepare_images(to_uint8(images)))
    return prompts


# Pretraining corpus: generic scenes labelled with attributes that are none of the tasks' labels: which of a
# set of random stroke and blob symbols is drawn (the ImageNet of this world) and coarse kind, tone, place
# and extent.
PRETRAIN_GROUPS = {"symbol": 96, "kind": 4, "tone": 3, "horizontal_half": 2, "vertical_half": 2, "extent": 2}
IGNORE = -100


@dataclass(frozen=True)
class PretrainingCorpus:
    images: Tensor  # uint8 [n, 3, size, size]
    labels: Tensor  # int64 [n, len(PRETRAIN_GROUPS)], IGNORE where an attribute does not apply


def random_symbols(generator: torch.Generator, count: int, strokes: int = 3) -> Tensor:
    """``count`` random symbols on an 8x8 grid in [0, 1] (like load_digits glyphs): the first half polylines,
    the second half filled blobs whose radius wobbles with the angle."""
    coords = torch.arange(8, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    pixels = torch.stack([x, y], dim=-1).reshape(1, 1, 64, 2)
    lines, blobs = count - count // 2, count // 2
    points = 1.0 + 6.0 * torch.rand((lines, strokes + 1, 2), generator=generator)
    start, end = points[:, :-1, None], points[:, 1:, None]  # [lines, strokes, 1, 2]
    direction = end - start
    along = ((pixels - start) * direction).sum(-1) / (direction**2).sum(-1).clamp(min=1e-6)
    nearest = start + along.clamp(0.0, 1.0)[..., None] * direction
    line_coverage = _edge(0.9 - (pixels - nearest).norm(dim=-1).amin(dim=1))
    angle = torch.atan2(y - 4.0, x - 4.0).reshape(1, 64)
    distance = torch.sqrt((x - 4.0) ** 2 + (y - 4.0) ** 2).reshape(1, 64)
    harmonics = torch.arange(2, 5, dtype=torch.float32)[None, :, None]
    amplitude = 0.3 * (2 * torch.rand((blobs, 3, 1), generator=generator) - 1)
    phase = 2 * math.pi * torch.rand((blobs, 3, 1), generator=generator)
    radius = 2.8 * (1.0 + (amplitude * torch.cos(harmonics * angle[:, None] + phase)).sum(dim=1))
    blob_coverage = _edge(radius - distance)
    return torch.cat([line_coverage, blob_coverage]).reshape(count, 8, 8)


def _tone(colours: Tensor) -> Tensor:
    """0 warm, 1 cool, 2 grey: a coarse colour attribute far from the 8-hue colour task."""
    maximum, minimum = colours.max(dim=1).values, colours.min(dim=1).values
    saturation = (maximum - minimum) / maximum.clamp(min=1e-6)
    warm = colours[:, 0] >= colours[:, 2]
    return torch.where(saturation < 0.25, 2, torch.where(warm, 0, 1))


def make_pretraining_corpus(n: int, generator: torch.Generator, size: int) -> PretrainingCorpus:
    """Mixed scenes (symbols, single shapes, dot groups, textures) with their generic attributes."""
    kind = torch.tensor([0, 0, 0, 1, 2, 3]).repeat(-(-n // 6))[:n]  # half of the scenes show symbols
    coverage = torch.zeros(n, size, size)
    symbol_scenes, objects, dots, textures = (torch.nonzero(kind == k).flatten() for k in range(4))

    symbols = random_symbols(generator, PRETRAIN_GROUPS["symbol"])
    symbol = torch.full((n,), IGNORE)
    symbol[symbol_scenes] = _cycle_indices(generator, len(symbol_scenes), len(symbols))
    count = len(symbol_scenes)
    coverage[symbol_scenes] = place_glyphs(
        symbols[symbol[symbol_scenes]],
        size,
        _uniform(generator, count, 0.75, 1.1),
        _uniform(generator, count, -2.0, 2.0),
        _uniform(generator, count, -2.0, 2.0),
        _uniform(generator, count, -0.15, 0.15),
    )
    radius = _uniform(generator, len(objects), 1.4, 6.4)
    cx, cy = _random_centre(generator, radius, size)
    coverage[objects] = shape_coverage(_choice(generator, len(objects), len(SHAPES)), cx, cy, radius, size)
    coverage[dots] = dots_coverage(generator, 1 + _choice(generator, len(dots), 8), size, canonical=False)
    coverage[textures] = texture_pattern(
        _choice(generator, len(textures), len(TEXTURES)), generator, size, False
    )

    # Varied looks (dark, pale, gradient, grainy) so the encoder's features cover every task's look.
    look = _choice(generator, n, 4)[:, None, None, None]
    dark = random_colour(generator, n, (0.0, 0.6), (0.0, 0.4))[:, :, None, None].expand(n, 3, size, size)
    pale = random_colour(generator, n, (0.0, 0.4), (0.7, 1.0))[:, :, None, None].expand(n, 3, size, size)
    grainy = add_noise(dark, generator, 0.09)
    background = torch.where(look == 0, dark, torch.where(look == 1, pale, grainy))
    background = torch.where(look == 2, gradient_background(generator, n, size, (0.1, 0.5)), background)
    foreground = random_colour(generator, n, (0.0, 1.0), (0.55, 1.0))
    on_pale = look[:, 0, 0, 0] == 1
    foreground = torch.where(on_pale[:, None], foreground * 0.45, foreground)
    images = add_noise(paint(background, foreground, coverage), generator, 0.03)

    x, y = _pixel_grid(size)
    mass = coverage.sum(dim=(1, 2)).clamp(min=1e-6)
    centre_x = (coverage * x).sum(dim=(1, 2)) / mass
    centre_y = (coverage * y).sum(dim=(1, 2)) / mass
    extent = mass / size**2
    located = kind != 3  # a texture fills the image: it has no half or extent
    labels = torch.stack(
        [
            symbol,
            kind,
            _tone(foreground),
            torch.where(located, (centre_x >= size / 2).long(), IGNORE),
            torch.where(located, (centre_y >= size / 2).long(), IGNORE),
            torch.where(located, (extent >= 0.12).long(), IGNORE),
        ],
        dim=1,
    )
    return PretrainingCorpus(to_uint8(images), labels)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
