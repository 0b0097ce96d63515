"""Visual prompts, ViP-LLaVA's own idea: a box, ellipse, triangle, point, arrow, scribble, mask or mask contour
drawn on the photo, so that a question can say "the object within the red rectangle".

    image + shape + coordinates (pixels of the image) + colour -> RGBA overlay -> alpha-composited -> RGB image
    -> then the processor pads it to a square and resizes it to 336 like any photo

ViP-LLaVA was trained on images marked by `llava/visual_prompt_generator.py` (original repo), so we draw the
same way: on a transparent RGBA overlay that is alpha-composited onto the image, with line widths that scale
with max(W, H) / 336 so a mark keeps its trained thickness after the resize to 336. Training drew colour,
width and alpha at random; `draw_visual_prompt` is deterministic and picks widths inside the trained ranges,
alpha 255 for outlines (the top of the trained 96-255: the most visible) and a translucent mask fill so the
object stays visible under it.

Quirks worth knowing:
- marks are drawn on the full-size image, before the square padding and the resize: coordinates are pixels
  of the image as a viewer shows it (EXIF rotation applied);
- transparent pixels become white first, as the processor's `to_rgb` does for the model;
- with `image_mode="crop"` a mark near the long edges is cut away (`crop_box`, `outside_crop`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw

from processor import to_rgb

# What `from processor import ...` still finds here (processor's __getattr__), for code written before the move.
__all__ = ["COLORS", "SHAPES", "parse_color", "parse_coords", "draw_visual_prompt", "crop_box", "outside_crop",
           "draw_visual_prompts", "sample_mark"]

COLORS = {  # the nine colours of the training data
    "red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255),
    "yellow": (255, 255, 0), "fuchsia": (255, 0, 255), "aqua": (0, 255, 255),
    "orange": (255, 165, 0), "purple": (128, 0, 128), "gold": (255, 215, 0),
}
SHAPES = ("box", "ellipse", "triangle", "point", "arrow", "scribble", "mask", "mask_contour")
_ALIASES = {"rectangle": "box", "mask contour": "mask_contour", "mask-contour": "mask_contour"}
# shape -> (coordinate form, fewest points, most points or None for any number)
_FORMS = {
    "box": ("x1,y1,x2,y2", 2, 2), "ellipse": ("x1,y1,x2,y2", 2, 2),
    "triangle": ("x1,y1,x2,y2,x3,y3", 3, 3), "point": ("x,y", 1, 1),
    "arrow": ("x1,y1,x2,y2 from tail to head", 2, 2), "scribble": ("x1,y1,x2,y2,...", 2, None),
    "mask": ("x1,y1,x2,y2,x3,y3,...", 3, None), "mask_contour": ("x1,y1,x2,y2,x3,y3,...", 3, None),
}
# Line width (point: radius) in pixels at 336. Trained ranges: rectangle, ellipse and triangle
# 2-8, arrow 1-6, scribble 2-12, point radius 5-20, mask contour 3 or 5 (a 1-px outline shifted
# by +-1 or +-2 px); the mask is a fill and has no width.
DEFAULT_WIDTH = {"box": 4, "ellipse": 4, "triangle": 4, "point": 8, "arrow": 3, "scribble": 5,
                 "mask": 0, "mask_contour": 4}
MASK_ALPHA = 88  # the middle of the trained 48-128


def parse_color(value):
    """A name from COLORS, an (R, G, B) tuple or an "R,G,B" string -> (R, G, B)."""
    if isinstance(value, str):
        name = value.strip().lower()
        if name in COLORS:
            return COLORS[name]
        if "," not in name:
            raise ValueError(f"unknown colour {value!r}: use one of {', '.join(COLORS)} or R,G,B")
    try:
        parts = value.split(",") if isinstance(value, str) else list(value)
        rgb = tuple(int(c) for c in parts)
        ok = len(rgb) == 3 and all(0 <= c <= 255 and c == float(v) for c, v in zip(rgb, parts))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"colour {value!r} is not R,G,B with three integers in 0..255")
    return rgb


def _shape_name(shape):
    name = shape.strip().lower()
    name = _ALIASES.get(name, name)
    if name not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: use one of {', '.join(SHAPES)} (or rectangle)")
    return name


def _expected(shape):
    form, fewest, most = _FORMS[shape]
    count = f"an even count, at least {2 * fewest}" if most is None else f"{2 * fewest}"
    return f"{form} ({count} numbers)"


def _count_ok(shape, n):
    _, fewest, most = _FORMS[shape]
    return n % 2 == 0 and n >= 2 * fewest and (most is None or n <= 2 * most)


def parse_coords(text, shape):
    """The command line's "40,60,220,300" -> [40.0, 60.0, 220.0, 300.0], checked for `shape`."""
    shape = _shape_name(shape)
    try:
        coords = [float(part) for part in text.split(",")]
    except ValueError:
        coords = None
    if coords is None or not all(map(math.isfinite, coords)) or not _count_ok(shape, len(coords)):
        raise ValueError(f"--{shape.replace('_', '-')} expects {_expected(shape)}, got {text!r}")
    return coords


def _catmull_rom(points):
    """Dense points of a Catmull-Rom spline, which passes through every one of `points`."""
    ends = [points[0], *points, points[-1]]  # repeat the ends so the curve reaches them
    out = [points[0]]
    for p0, p1, p2, p3 in zip(ends, ends[1:], ends[2:], ends[3:]):
        n = max(1, math.ceil(math.dist(p1, p2)))  # about one sample per pixel: no visible kinks
        for i in range(1, n + 1):
            t = i / n
            out.append(tuple(0.5 * (2 * b + (c - a) * t + (2 * a - 5 * b + 4 * c - d) * t * t
                                    + (3 * b - a - 3 * c + d) * t ** 3)
                             for a, b, c, d in zip(p0, p1, p2, p3)))
    return out


def _draw_arrow(draw, tail, head, fill, width, scale):
    length = math.dist(tail, head)
    if length == 0:
        raise ValueError("arrow: the tail and the head are the same point")
    # Training heads were 20-50% of the arrow's length and at least 6 px at 336; 2x the
    # line width keeps a thick shaft from swallowing the head.
    size = min(max(0.3 * length, 6 * scale, 2 * width), length)
    back = math.atan2(tail[1] - head[1], tail[0] - head[0])  # direction from the head to the tail
    # Barbs at +-60 degrees from the shaft, the wide head the training arrows had.
    barbs = [(head[0] + size * math.cos(back + s * math.pi / 3),
              head[1] + size * math.sin(back + s * math.pi / 3)) for s in (1, -1)]
    # The shaft ends inside the head, so its flat end neither pokes past the tip nor leaves a gap.
    stop = (head[0] + size / 4 * math.cos(back), head[1] + size / 4 * math.sin(back))
    draw.line([tail, stop], fill=fill, width=width)
    draw.polygon([barbs[0], head, barbs[1]], fill=fill)


def _area(points):  # shoelace formula
    pairs = zip(points, points[1:] + points[:1])
    return abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in pairs)) / 2


def draw_visual_prompt(image, shape, coords, color="red", width=None, alpha=None):
    """A copy of `image` with `shape` drawn at `coords` (pixels of `image`; forms in _FORMS).

    The result is always RGB: transparent pixels become white first, as `to_rgb` does for the model.
    `width` (for a point: its radius) is in pixels of `image`, by default DEFAULT_WIDTH scaled
    by max(W, H) / 336; `alpha` 0-255 defaults to 255, or MASK_ALPHA for a mask.
    """
    shape = _shape_name(shape)
    fill = parse_color(color)
    coords = [float(c) for c in coords]
    if not _count_ok(shape, len(coords)):
        raise ValueError(f"{shape} expects {_expected(shape)}, got {len(coords)} numbers")
    alpha = (MASK_ALPHA if shape == "mask" else 255) if alpha is None else alpha
    if not 0 <= alpha <= 255:
        raise ValueError(f"alpha must be in 0..255, got {alpha}")
    fill += (round(alpha),)
    if width is not None and not width >= 1:  # also NaN; 0 or less would draw a 1-pixel line, not what was asked
        raise ValueError(f"width must be at least 1 pixel, got {width:g}")
    image = to_rgb(image)  # transparency onto white, as the processor does
    W, H = image.size
    points = list(zip(coords[0::2], coords[1::2]))
    for x, y in points:
        if not (0 <= x <= W and 0 <= y <= H):  # also catches NaN
            raise ValueError(f"{shape}: point ({x:g}, {y:g}) is outside the {W}x{H} image")
    # x = W (or y = H) is the image's far border: draw it on the last pixel column (row).
    points = [(min(x, W - 1), min(y, H - 1)) for x, y in points]
    scale = max(W, H) / 336
    width = max(1, round(DEFAULT_WIDTH[shape] * scale if width is None else width))

    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)  # draws replace overlay pixels, so overlaps keep one alpha
    if shape in ("box", "ellipse"):
        (x1, y1), (x2, y2) = points
        box = [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]
        if box[0] == box[2] or box[1] == box[3]:
            raise ValueError(f"{shape} {coords} has zero area")
        (draw.rectangle if shape == "box" else draw.ellipse)(box, outline=fill, width=width)
    elif shape == "point":
        (x, y), = points
        draw.ellipse([x - width, y - width, x + width, y + width], fill=fill)
    elif shape == "arrow":
        _draw_arrow(draw, *points, fill, width, scale)
    elif shape == "scribble":
        draw.line(_catmull_rom(points), fill=fill, width=width, joint="curve")
    else:  # triangle, mask, mask_contour: polygons
        if _area(points) == 0:
            raise ValueError(f"{shape} {coords} has zero area (its points lie on one line)")
        if shape == "mask":
            draw.polygon(points, fill=fill)
        else:  # repeat the first two points so the closing corner is rounded like the others
            draw.line(points + points[:2], fill=fill, width=width, joint="curve")
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def crop_box(width, height):
    """(left, top, right, bottom) of what a centre crop to a min(W, H) square keeps."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def outside_crop(coords, width, height):
    """True if a point of `coords` falls outside crop_box: `--image-mode crop` cuts the mark."""
    left, top, right, bottom = crop_box(width, height)
    points = zip(coords[0::2], coords[1::2])
    return any(not (left <= x <= right and top <= y <= bottom) for x, y in points)


def draw_visual_prompts(image, prompts: list):
    """`image` with each of `prompts` ({"shape", "coords", "color", "width", "alpha"}, coords a list or "x,y,...")
    drawn in order: the form question files and training records give them in."""
    for v in prompts:
        if not isinstance(v, dict) or "shape" not in v or "coords" not in v:
            raise ValueError(f'a visual prompt must be {{"shape", "coords", "color"}}, got {v!r}')
        coords = parse_coords(v["coords"], v["shape"]) if isinstance(v["coords"], str) else v["coords"]
        if not isinstance(coords, list) or not all(isinstance(c, (int, float)) for c in coords):
            raise ValueError(f"visual prompt coords must be a list of numbers or 'x1,y1,...', got {v['coords']!r}")
        image = draw_visual_prompt(image, v["shape"], coords, v.get("color", "red"), v.get("width"), v.get("alpha"))
    return image


# ---------------------------------------------------------------------------- random marks, as in training
# llava/visual_prompt_generator.py's `words_shape`: how the text names each shape ("within the red rectangle").
SHAPE_WORDS = {"box": ("within", "rectangle"), "ellipse": ("within", "ellipse"), "triangle": ("with", "triangle"),
               "point": ("at", "point"), "scribble": ("with", "scribble"), "mask_contour": ("with", "mask contour"),
               "mask": ("with", "mask"), "arrow": ("pointed to by", "arrow")}
# Trained ranges at 336 px, scaled by max(W, H) / 336 (point: its radius; mask contour: 1-2 px shifted both ways).
TRAIN_WIDTHS = {"box": (2, 8), "ellipse": (2, 8), "triangle": (2, 8), "point": (5, 20), "arrow": (1, 6),
                "scribble": (2, 12), "mask_contour": (1, 2), "mask": (0, 0)}


@dataclass
class Mark:
    """One visual prompt sampled for training: what to draw and the phrase that names it."""
    shape: str
    coords: list
    color: tuple  # (R, G, B)
    color_name: str | None  # None: a random colour the text does not name
    width: int
    alpha: int

    @property
    def phrase(self) -> str:  # "within the red rectangle"; "within the rectangle" for an unnamed colour
        how, what = SHAPE_WORDS[self.shape]
        return f"{how} the {self.color_name + ' ' if self.color_name else ''}{what}"

    def draw(self, image):
        return draw_visual_prompt(image, self.shape, self.coords, self.color, self.width, self.alpha)


def _in_box(rng, box):
    x1, y1, x2, y2 = box
    return rng.uniform(x1, x2), rng.uniform(y1, y2)


def _max_angle(points) -> float:  # degrees, the widest angle of a triangle
    a, b, c = (math.dist(points[i], points[(i + 1) % 3]) for i in range(3))
    if min(a, b, c) == 0:
        return 180.0
    cosines = ((b * b + c * c - a * a) / (2 * b * c), (a * a + c * c - b * b) / (2 * a * c),
               (a * a + b * b - c * c) / (2 * a * b))
    return max(math.degrees(math.acos(max(-1.0, min(1.0, x)))) for x in cosines)


def sample_mark(rng, size: tuple, bbox, segmentation=None, shapes=SHAPES, color_names=tuple(COLORS)) -> Mark:
    """A random mark around `bbox` (x1, y1, x2, y2 pixels of an image of `size` (W, H)) as ViP-LLaVA's training
    drew them: one of `shapes`; a colour from `color_names` or, with p = 0.5 (if the pool has any choice left),
    a random RGB left unnamed; alpha 96-255 (mask 48-128); widths in TRAIN_WIDTHS x max(W, H) / 336. A mask or
    mask contour follows the first polygon of `segmentation` (COCO [x1, y1, x2, y2, ...]), else the box.
    `rng` is a `random.Random`, so that a (seed, epoch, sample) gives the same mark every time."""
    W, H = size
    x1, y1, x2, y2 = (float(v) for v in bbox)
    if not (0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H):
        raise ValueError(f"bbox {list(bbox)} is not x1 < x2, y1 < y2 inside the {W}x{H} image")
    box, scale = (x1, y1, x2, y2), max(W, H) / 336
    shape = _shape_name(rng.choice(list(shapes)))
    lo, hi = TRAIN_WIDTHS[shape]
    width = max(1, rng.randint(int(lo * scale), max(int(lo * scale), int(hi * scale))))
    alpha = rng.randint(48, 128) if shape == "mask" else rng.randint(96, 255)
    if color_names and rng.random() >= 0.5:
        name = rng.choice(list(color_names))
        color = COLORS[name]
    else:
        name, color = None, tuple(rng.randint(0, 255) for _ in range(3))

    def clip(x, y):
        return [min(max(x, 0.0), W), min(max(y, 0.0), H)]

    if shape == "box":
        coords = [x1, y1, x2, y2]
    elif shape == "ellipse":  # enlarged 1-1.5x around its centre (kept inside the image)
        r, cx, cy = rng.uniform(1, 1.5), (x1 + x2) / 2, (y1 + y2) / 2
        coords = clip(cx - (cx - x1) * r, cy - (cy - y1) * r) + clip(cx + (x2 - cx) * r, cy + (y2 - cy) * r)
    elif shape == "triangle":  # three points in the box, no angle over 150 degrees
        for _ in range(100):
            points = [_in_box(rng, box) for _ in range(3)]
            if _max_angle(points) < 150:
                break
        else:
            points = [(x1, y2), ((x1 + x2) / 2, y1), (x2, y2)]
        coords = [c for p in points for c in p]
    elif shape == "point":  # near the centre: normal with a standard deviation of a sixth of the side, in the box
        cx, cy = rng.gauss((x1 + x2) / 2, (x2 - x1) / 6), rng.gauss((y1 + y2) / 2, (y2 - y1) / 6)
        coords = [min(max(cx, x1), x2), min(max(cy, y1), y2)]
    elif shape == "scribble":  # a cubic Bezier through four random points of the box, as a dense polyline
        p = [_in_box(rng, box) for _ in range(4)]
        ts = [i / 32 for i in range(33)]
        coords = [c for t in ts for c in (
            (1 - t) ** 3 * p[0][0] + 3 * (1 - t) ** 2 * t * p[1][0] + 3 * (1 - t) * t * t * p[2][0] + t ** 3 * p[3][0],
            (1 - t) ** 3 * p[0][1] + 3 * (1 - t) ** 2 * t * p[1][1] + 3 * (1 - t) * t * t * p[2][1] + t ** 3 * p[3][1])]
    elif shape == "arrow":  # the head near the box's centre, the tail 0.8 x the short side to 50 px away
        head = ((x1 + x2) / 2 + rng.uniform(-0.25, 0.25) * (x2 - x1),
                (y1 + y2) / 2 + rng.uniform(-0.25, 0.25) * (y2 - y1))
        length, angle = rng.uniform(0.8 * min(x2 - x1, y2 - y1), 50 * scale), rng.uniform(0, 2 * math.pi)
        tail = clip(head[0] + length * math.cos(angle), head[1] + length * math.sin(angle))
        if math.dist(tail, head) < 1:  # clipped onto the head at an image corner: point the other way
            tail = clip(head[0] - length * math.cos(angle), head[1] - length * math.sin(angle))
        coords = tail + list(head)
    else:  # mask, mask_contour
        polygon = segmentation[0] if segmentation else [x1, y1, x2, y1, x2, y2, x1, y2]
        coords = [float(c) for c in polygon]
        if shape == "mask_contour":
            width = 2 * width + 1  # the original draws a 1-px outline shifted by -w..w
    return Mark(shape, coords, color, name, width, alpha)
