"""The shapes world: its vocabulary (shapes, colours, sizes), a scene (objects with position and size), sampling
a scene from a seeded generator, and rendering it to a uint8 image with numpy.

Everything is a pure function of seeded generators (``random.Random`` for the scene, a numpy ``Generator`` for
the pixels), so an image is fully determined by its seed.
Coordinates are in pixels of the output image: pixel ``i`` covers ``[i, i + 1)``, its centre is ``i + 0.5``,
``y`` grows downwards. Boxes are ``(x0, y0, x1, y1)``, the tight box of the shape's geometry.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

import numpy as np

__all__ = [
    "SHAPES",
    "SHAPE_PLURALS",
    "COLOURS",
    "PALETTE",
    "SIZES",
    "SIZE_RADIUS",
    "Scene",
    "sample_scene",
    "render_scene",
    "grid_cell",
    "objects_named",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")
SHAPE_PLURALS: tuple[str, ...] = ("circles", "squares", "triangles", "diamonds", "stars", "crosses")
COLOURS: tuple[str, ...] = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "white")
# Saturated, well separated in hue or lightness; the background is a low-saturation mid/dark tone.
PALETTE: np.ndarray = np.array(
    [
        [225, 30, 30],  # red
        [255, 140, 0],  # orange
        [250, 230, 40],  # yellow
        [30, 185, 50],  # green
        [0, 215, 235],  # cyan
        [40, 80, 245],  # blue
        [165, 55, 225],  # purple
        [245, 245, 245],  # white
    ],
    dtype=np.float32,
)
SIZES: tuple[str, ...] = ("small", "large")
# Shape "radius" as a fraction of the image side, per size; the ranges leave a gap so size is never borderline.
SIZE_RADIUS: tuple[tuple[float, float], ...] = ((0.075, 0.095), (0.14, 0.17))
# Two objects' boxes may share at most this fraction of the smaller box (keeps every object mostly visible).
MAX_OVERLAP = 0.15


def _halfplanes(vertices: list[tuple[float, float]]) -> np.ndarray:
    """Convex polygon -> (K, 3) rows (a, b, c) with inside <=> a*x + b*y <= c for every row."""
    v = np.asarray(vertices, dtype=np.float64)
    centre = v.mean(0)
    rows = []
    for p, q in zip(v, np.roll(v, -1, axis=0)):
        n = np.array([q[1] - p[1], -(q[0] - p[0])])
        c = float(n @ p)
        if n @ centre > c:  # make the normal point outwards
            n, c = -n, -c
        rows.append((n[0], n[1], c))
    return np.asarray(rows, dtype=np.float32)


def _star_kites(outer: float, inner: float) -> list[list[tuple[float, float]]]:
    """A 5-point star as 5 convex kites (centre, inner, tip, inner); together they cover the star exactly."""
    up = -np.pi / 2
    tips = [(outer * np.cos(up + 2 * np.pi * k / 5), outer * np.sin(up + 2 * np.pi * k / 5)) for k in range(5)]
    inns = [
        (inner * np.cos(up + np.pi / 5 * (2 * k + 1)), inner * np.sin(up + np.pi / 5 * (2 * k + 1))) for k in range(5)
    ]
    return [[(0.0, 0.0), inns[k - 1], tips[k], inns[k]] for k in range(5)]


def _shift(polys: list[list[tuple[float, float]]], dy: float) -> list[list[tuple[float, float]]]:
    return [[(x, y + dy) for x, y in p] for p in polys]


def _build_geometry() -> tuple[list[list[np.ndarray] | None], np.ndarray]:
    """Per shape: a union of convex polygons in units of the radius (None = the unit disc), and its extents
    (xmin, ymin, xmax, ymax). Sizes are chosen so the shapes cover similar areas (2.1-3.1 r^2)."""
    tri = [(0.0, -1.4), (1.4 * np.sqrt(3) / 2, 0.7), (-1.4 * np.sqrt(3) / 2, 0.7)]
    star = _star_kites(1.3, 0.55)
    star_bottom = 1.3 * np.cos(np.pi / 5)
    polys: dict[str, list[list[tuple[float, float]]] | None] = {
        "circle": None,
        "square": [[(-0.88, -0.88), (0.88, -0.88), (0.88, 0.88), (-0.88, 0.88)]],
        "triangle": _shift([tri], 0.35),  # centre the box vertically (y spans -1.05..1.05)
        "diamond": [[(0.0, -1.2), (0.95, 0.0), (0.0, 1.2), (-0.95, 0.0)]],
        "star": _shift(star, (1.3 - star_bottom) / 2),
        "cross": [
            [(-0.36, -1.05), (0.36, -1.05), (0.36, 1.05), (-0.36, 1.05)],
            [(-1.05, -0.36), (1.05, -0.36), (1.05, 0.36), (-1.05, 0.36)],
        ],
    }
    geoms: list[list[np.ndarray] | None] = []
    extents = np.zeros((len(SHAPES), 4), dtype=np.float32)
    for i, name in enumerate(SHAPES):
        p = polys[name]
        if p is None:
            geoms.append(None)
            extents[i] = (-1, -1, 1, 1)
        else:
            geoms.append([_halfplanes(q) for q in p])
            pts = np.concatenate([np.asarray(q) for q in p])
            extents[i] = (pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max())
    return geoms, extents


_GEOMS, EXTENTS = _build_geometry()


@dataclass(frozen=True)
class Scene:
    """Objects of one image, in drawing order (later ones on top). Attributes are indices into SHAPES, COLOURS,
    SIZES; ``cx, cy, r`` are the centre of the shape's box and its radius in pixels."""

    img_size: int
    shape: tuple[int, ...]
    colour: tuple[int, ...]
    size: tuple[int, ...]
    cx: tuple[float, ...]
    cy: tuple[float, ...]
    r: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.shape)

    def boxes(self) -> np.ndarray:
        """(n, 4) float32 boxes (x0, y0, x1, y1) in pixels of the output image."""
        if self.n == 0:
            return np.zeros((0, 4), np.float32)
        ext = EXTENTS[list(self.shape)]  # (n, 4) in radius units
        r = np.asarray(self.r, np.float32)[:, None]
        c = np.stack([self.cx, self.cy, self.cx, self.cy], 1).astype(np.float32)
        return c + ext * r

    def labels(self) -> np.ndarray:
        """(n, 3) int64 rows (shape, colour, size) as indices into SHAPES, COLOURS, SIZES."""
        return np.array([self.shape, self.colour, self.size], dtype=np.int64).T.reshape(self.n, 3)


def objects_named(word: str, labels) -> list[int]:
    """Indices of the objects a colour or shape word (singular or plural) names, given a sample's ``labels`` rows
    (shape, colour, size); ``[]`` for other words and for words that name nothing in the image."""
    if word in COLOURS:
        return [k for k, row in enumerate(labels) if row[1] == COLOURS.index(word)]
    for names in (SHAPES, SHAPE_PLURALS):
        if word in names:
            return [k for k, row in enumerate(labels) if row[0] == names.index(word)]
    return []


def grid_cell(x: float, img_size: int) -> int:
    """Which third of the image a coordinate falls in: 0 (left/top), 1 (middle), 2 (right/bottom)."""
    return min(2, int(3 * x / img_size))


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection of two boxes as a fraction of the smaller one."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    area = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return w * h / area


def sample_scene(
    rng: random.Random,
    img_size: int,
    min_objects: int = 1,
    max_objects: int = 4,
    holdout: frozenset[tuple[int, int]] = frozenset(),
    tries: int = 40,
) -> Scene:
    """Draw ``min_objects..max_objects`` objects with uniform shape, colour and size, placed uniformly with their
    box inside the image and at most MAX_OVERLAP box overlap with any other object. ``holdout`` holds
    (colour, shape) index pairs that must not appear (the training split of a compositional test). An object
    that finds no place in ``tries`` draws is tried once more small, then dropped, so a crowded draw can end
    with fewer objects. Uses Python's ``random.Random`` (scalar draws are ~10x cheaper than numpy's)."""
    n = rng.randint(min_objects, max_objects)
    placed: list[tuple[int, int, int, float, float, float]] = []
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(n):
        shape = rng.randrange(len(SHAPES))
        colour = rng.randrange(len(COLOURS))
        while (colour, shape) in holdout:  # the caller checked that every shape keeps at least one colour
            colour = rng.randrange(len(COLOURS))
        size = rng.randrange(len(SIZES))
        for attempt_size in (size, 0) if size else (size,):
            lo, hi = SIZE_RADIUS[attempt_size]
            r = rng.uniform(lo, hi) * img_size
            e0, e1, e2, e3 = (float(e) * r for e in EXTENTS[shape])
            found = None
            for _ in range(tries):
                # keep a 1 px margin so no object touches the border
                cx, cy = rng.uniform(1 - e0, img_size - 1 - e2), rng.uniform(1 - e1, img_size - 1 - e3)
                box = (cx + e0, cy + e1, cx + e2, cy + e3)
                if all(_overlap(box, b) <= MAX_OVERLAP for b in boxes):
                    found = (cx, cy, box)
                    break
            if found is not None:
                placed.append((shape, colour, attempt_size, found[0], found[1], r))
                boxes.append(found[2])
                break
    if not placed:
        raise RuntimeError(f"sample_scene: could not place any object in a {img_size} px image")
    cols = list(zip(*placed))
    return Scene(img_size, *(tuple(c) for c in cols))  # type: ignore[arg-type]


@functools.lru_cache(maxsize=64)
def _interp_matrix(grid: int, size: int) -> np.ndarray:
    """(size, grid) weights that linearly interpolate a grid of ``grid`` points to ``size`` pixel centres."""
    pos = (np.arange(size) + 0.5) / size * (grid - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, grid - 2)
    w = (pos - i0).astype(np.float32)
    m = np.zeros((size, grid), np.float32)
    m[np.arange(size), i0] = 1 - w
    m[np.arange(size), i0 + 1] = w
    return m


def _background(rng: np.random.Generator, s: int) -> np.ndarray:
    """(s, s, 3) float32 background: a dim, low-saturation base tone + smooth colour blobs + (sometimes)
    faint stripes. Varies per image so the model cannot subtract a fixed background."""
    u = rng.random(10)  # all scalar parameters in one draw (numpy's per-call overhead dominates at 64 px)
    base = (45 + 80 * u[0] + 36 * (u[1:4] - 0.5)).astype(np.float32)  # grey-ish tone, slight tint
    g = 3 + int(4 * u[4])
    blobs = (rng.random((g, g * 3), dtype=np.float32) - 0.5) * np.float32(2 * (8 + 22 * u[5]))
    m = _interp_matrix(g, s)  # (s, g)
    rows = (m @ blobs).reshape(s, g, 3)  # interpolate along y: (s, g, 3)
    img = (rows.transpose(0, 2, 1) @ m.T).transpose(0, 2, 1) + base  # then along x: (s, 3, s) -> (s, s, 3)
    if u[6] < 0.4:
        # stripes amp * sin(a x + b y + phase), separable: sin(ax) cos(by + p) + cos(ax) sin(by + p)
        theta, freq, phase = np.pi * u[7], 2 * np.pi * (3 + 5 * u[8]) / s, 2 * np.pi * u[9]
        coord = np.arange(s, dtype=np.float32)
        ax, by = freq * np.cos(theta) * coord, freq * np.sin(theta) * coord + phase
        amp = np.float32(6 + 8 * u[6] / 0.4)
        wave = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))  # (s, s) rows = y
        img += (amp * wave.astype(np.float32))[..., None]
    return img


def _inside(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact point-in-shape test on the grid u (W,) x v (H,) in radius units -> (H, W) bool."""
    geom = _GEOMS[shape]
    if geom is None:
        return (u[None, :] ** 2 + v[:, None] ** 2) <= 1.0
    inside = np.zeros((v.size, u.size), bool)
    for hp in geom:  # union of convex pieces; each is an intersection of half-planes
        piece = np.ones_like(inside)
        for a, b, c in hp:
            piece &= (a * u[None, :] + b * v[:, None]) <= c
        inside |= piece
    return inside


# Shapes are rasterised once into a fine template over [-_T_EXT, _T_EXT]^2 radius units; drawing an object then
# is a gather at its sample points (one fancy index instead of up to 20 half-plane tests: ~5x faster).
_T_RES, _T_EXT = 512, 1.5
_T_AXIS = ((np.arange(_T_RES, dtype=np.float32) + 0.5) / _T_RES * 2 - 1) * _T_EXT
_TEMPLATES = np.stack([_inside(k, _T_AXIS, _T_AXIS) for k in range(len(SHAPES))])  # (n_shapes, R, R) bool
_SUB = np.array([0.25, 0.75], np.float32)  # 2x2 supersampling offsets inside a pixel (anti-aliased edges)


def _coverage(shape: int, cx: float, cy: float, r: float, x0: int, x1: int, y0: int, y1: int) -> np.ndarray:
    """(y1-y0, x1-x0) fraction of each pixel inside the shape, from 2x2 samples looked up in the template."""
    scale = _T_RES / (2 * _T_EXT * r)
    ix = ((np.arange(x0, x1, dtype=np.float32)[:, None] + _SUB).ravel() - cx) * scale + _T_RES / 2  # (2W,)
    iy = ((np.arange(y0, y1, dtype=np.float32)[:, None] + _SUB).ravel() - cy) * scale + _T_RES / 2  # (2H,)
    ix = np.clip(ix, 0, _T_RES - 1).astype(np.intp)  # the box lies inside the template, clip is float safety
    iy = np.clip(iy, 0, _T_RES - 1).astype(np.intp)
    inside = np.take(np.take(_TEMPLATES[shape], iy, 0), ix, 1).view(np.uint8)  # (2H, 2W) 0/1; take: 2x faster
    hits = inside[0::2] + inside[1::2]  # sum the 2x2 samples: rows, then columns -> (H, W) in 0..4
    return (hits[:, 0::2] + hits[:, 1::2]) * np.float32(0.25)


def render_scene(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Render to a (H, W, 3) uint8 image; ``rng`` draws the background, shading and pixel noise."""
    s = scene.img_size
    img = _background(rng, s)
    boxes = scene.boxes()
    for k in range(scene.n):
        colour = PALETTE[scene.colour[k]] * np.float32(rng.uniform(0.88, 1.0))
        b = boxes[k]
        x0, y0 = max(0, int(np.floor(b[0]))), max(0, int(np.floor(b[1])))
        x1, y1 = min(s, int(np.ceil(b[2]))), min(s, int(np.ceil(b[3])))
        alpha = _coverage(scene.shape[k], scene.cx[k], scene.cy[k], scene.r[k], x0, x1, y0, y1)[..., None]
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch + alpha * (colour - patch)
    sigma = rng.uniform(2, 9)
    # luminance grain over everything; uniform noise is 5x cheaper to draw than normal and looks the same
    img += (rng.random((s, s, 1), dtype=np.float32) - 0.5) * np.float32(2 * sigma)
    return np.clip(img, 0, 255).astype(np.uint8)
