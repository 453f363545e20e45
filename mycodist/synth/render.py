"""Render one photo-like JPEG of a species: ground texture, soft shadows, 1–3 shaded fruit bodies, camera.

A fruit body is drawn as surfaces of revolution seen from the side (stem, ring, bulb, cap, gill
underside), each with an analytic normal, so one light direction gives consistent Lambert shading and
highlights. Cap texture and spots are sampled in the cap's own (azimuth, height) coordinates, so they
wrap around the cap and move with it. All work is numpy over the fruit body's bounding box only, which
is what keeps a 256 px image near 10 ms on one core (benchmarks/synth.py).

What varies per photo (drawn from the photo's own generator, so a photo depends only on seed, species
index and photo index): aspect, ground kind (habitat-weighted), light direction, colour and strength,
count, position, scale, tilt, stem bend, view height, spot layout, depth of field, blur, noise,
white balance, vignette and JPEG quality.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from mycodist.synth.species import HABITATS, Traits
from mycodist.synth.textures import GRASS_GREENS, background, smooth_noise

# cap profile: (height / radius, half width / radius as a function of tau = height fraction 0..1)
CAP_PROFILES = {
    "convex": (0.55, lambda tau: np.sqrt(np.maximum(1 - tau * tau, 0))),
    "flat": (0.3, lambda tau: np.sqrt(np.maximum(1 - tau ** 4, 0))),
    "conical": (1.05, lambda tau: np.maximum(1 - tau, 0) ** 0.8),
    "bell": (0.9, lambda tau: np.sqrt(np.maximum(1 - tau ** 2.6, 0)) * (1 + 0.12 * (1 - tau) ** 8)),
    "funnel": (0.7, lambda tau: 0.28 + 0.72 * np.maximum(tau, 0) ** 0.75),
}
TEX = 64  # side of the per-fruit-body texture maps


@dataclass(frozen=True)
class Light:
    direction: np.ndarray  # unit (x right, y up, z towards camera)
    colour: np.ndarray     # RGB multiplier of the direct light
    ambient: np.ndarray    # RGB of the ambient term

    def shade(self, nx: np.ndarray, ny: np.ndarray, nz: np.ndarray, gloss: float) -> np.ndarray:
        """Lambert plus a Blinn highlight for unit normals; returns an (..., 3) RGB multiplier."""
        lx, ly, lz = self.direction
        ndl = np.maximum(nx * lx + ny * ly + nz * lz, 0)
        out = self.ambient + self.colour * ndl[..., None]
        if gloss > 0:
            hx, hy, hz = lx, ly, lz + 1.0
            norm = np.sqrt(hx * hx + hy * hy + hz * hz)
            ndh = np.maximum((nx * hx + ny * hy + nz * hz) / norm, 0)
            out = out + (gloss * ndh ** 24)[..., None]
        return out


@dataclass(frozen=True)
class Body:
    """One fruit body in image pixels: base point, cap radius, tilt, stem bend, gill view, funnel view."""

    x: float
    y: float
    radius: float
    tilt: float
    bend: float
    gill_view: float
    top_view: float


def _sample_light(rng: np.random.Generator) -> Light:
    d = np.array([rng.uniform(-0.9, 0.9), rng.uniform(0.15, 1.0), rng.uniform(0.25, 1.0)], np.float32)
    d /= np.linalg.norm(d)
    warmth = rng.uniform(-0.08, 0.1)
    colour = np.array([1 + warmth, 1.0, 1 - warmth], np.float32) * rng.uniform(0.55, 1.0)
    ambient = np.array([1 - warmth / 2, 1.0, 1 + warmth], np.float32) * rng.uniform(0.25, 0.45)
    return Light(direction=d, colour=colour, ambient=ambient)


def _soft(x: np.ndarray) -> np.ndarray:
    """Coverage from a signed distance in pixels (positive inside): a one-pixel antialiased edge."""
    return np.clip(x + 0.5, 0, 1)


def _over(dst: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    dst += (colour - dst) * alpha[..., None]


def _tex_lookup(tex: np.ndarray, a: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Sample a TEX×TEX map at azimuth a in -1..1 (columns) and height tau in 0..1 (rows)."""
    ix = ((a * 0.5 + 0.5) * (TEX - 1)).astype(np.intp)
    iy = (np.clip(tau, 0, 1) * (TEX - 1)).astype(np.intp)
    return tex[iy, np.clip(ix, 0, TEX - 1)]


def _cap_albedo(t: Traits, rng: np.random.Generator, a: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Cap colour with centre shading, texture and spots; spots are new per photo, their kind is not."""
    rgb = np.asarray(t.cap_rgb, np.float32)
    centre = 1 + (t.cap_centre_shade - 1) * np.clip(tau, 0, 1) ** 1.5
    if t.cap_texture == "fibrous":
        mod = 1 + 0.45 * (_tex_lookup(smooth_noise(rng, 3, 48, TEX, TEX), a, tau) - 0.5)
    elif t.cap_texture == "scaly":
        n = _tex_lookup(smooth_noise(rng, 10, 18, TEX, TEX), a, tau)
        mod = 1 - 0.4 * np.clip((n - 0.58) * 8, 0, 1)
    elif t.cap_texture == "velvety":
        mod = 1 + 0.22 * (_tex_lookup(smooth_noise(rng, 32, 32, TEX, TEX), a, tau) - 0.5)
    else:
        mod = 1 + 0.12 * (_tex_lookup(smooth_noise(rng, 4, 4, TEX, TEX), a, tau) - 0.5)
    albedo = rgb * (centre * mod)[..., None]
    if t.spots != "none":
        rows, cols, lo = (9, 20, 0.7) if t.spots == "warts" else (4, 7, 0.62)
        n = _tex_lookup(smooth_noise(rng, rows, cols, TEX, TEX), a, tau)
        mask = np.clip((n - lo) * 14, 0, 1) * np.clip(tau * 3 + 0.2, 0, 1)
        _over(albedo, np.asarray(t.spot_rgb, np.float32), mask)
    return albedo


def draw_body(img: np.ndarray, body: Body, t: Traits, light: Light, rng: np.random.Generator,
              crop_to_parts: bool = True) -> None:
    """Composite one fruit body onto img (H×W×3 uint8) in place.

    Each part (gills, stem, bulb, ring, cap, funnel cup) is computed only over the pixels of its own
    rotated bounding box: that, not the maths, is what decides the speed. `crop_to_parts=False` computes
    every part over the whole frame instead (same picture; the benchmark's baseline).
    """
    h_img, w_img = img.shape[:2]
    r = body.radius
    cap_h, profile = CAP_PROFILES[t.cap_shape]
    stem_len = t.stem_length * r
    stem_w = max(t.stem_thickness * r, 1.0)
    cap_du = body.bend * r * 0.35  # the stem bends; the cap sits on its top
    c, s = float(np.cos(body.tilt)), float(np.sin(body.tilt))

    def box(ulo: float, uhi: float, vlo: float, vhi: float) -> tuple[int, int, int, int]:
        """Image-pixel bounds of the local rectangle [ulo, uhi] × [vlo, vhi] after the tilt."""
        if not crop_to_parts:
            return 0, w_img, 0, h_img
        us_ = np.array([ulo, uhi, ulo, uhi]) * 1.0
        vs_ = np.array([vlo, vlo, vhi, vhi]) * 1.0
        xs, ys = body.x + us_ * c + vs_ * s, body.y + us_ * s - vs_ * c
        return (max(int(xs.min()) - 1, 0), min(int(xs.max()) + 2, w_img),
                max(int(ys.min()) - 1, 0), min(int(ys.max()) + 2, h_img))

    reach = max(r * 1.2, stem_w * 2.2) + abs(cap_du) + 2
    x0, x1, y0, y1 = box(-reach, reach, -stem_w - 2, stem_len + cap_h * r + r * body.top_view + 2)
    if x0 >= x1 or y0 >= y1:
        return
    patch = img[y0:y1, x0:x1].astype(np.float32) * (1 / 255)
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] - body.x
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] - body.y
    u_all = dx * c + dy * s
    v_all = dx * s - dy * c
    lx, ly, lz = light.direction
    # the light in the body's own frame, so shading follows the tilt
    local = Light(direction=np.array([lx * c - ly * s, lx * s + ly * c, lz], np.float32), colour=light.colour,
                  ambient=light.ambient)

    def part(ulo: float, uhi: float, vlo: float, vhi: float):
        bx0, bx1, by0, by1 = box(ulo, uhi, vlo, vhi)
        sl = (slice(max(by0 - y0, 0), max(by1 - y0, 0)), slice(max(bx0 - x0, 0), max(bx1 - x0, 0)))
        return u_all[sl], v_all[sl], patch[sl]

    # gills: the underside seen as a flat ellipse under the rim (not for funnels: their outside is the gills)
    if t.cap_shape != "funnel" and body.gill_view > 0.02:
        rx, ry = r * float(profile(np.float32(0.0))) * 0.96, r * body.gill_view
        u, v, p = part(cap_du - rx - 1, cap_du + rx + 1, stem_len - ry - 1, stem_len + 1)
        if p.size:
            gu, gv = (u - cap_du) / rx, (stem_len - v) / ry
            rho = np.sqrt(gu * gu + gv * gv)
            alpha = _soft((1 - rho) * ry) * _soft(stem_len - v)
            ridges = 1 - 0.45 * (0.5 + 0.5 * np.cos(np.arctan2(gv, gu) * 70)) ** 3
            shade = (0.35 + 0.65 * rho) * ridges
            col = np.asarray(t.gill_rgb, np.float32) * shade[..., None] * (light.ambient * 1.4 + light.colour * 0.25)
            _over(p, col, alpha)

    # stem: a tapering, bending cylinder, darker just under the cap
    stem_top = stem_len + cap_h * r * 0.3
    sw_max = stem_w * 1.25 + abs(cap_du) * 1.5 + 1
    u, v, p = part(-sw_max, sw_max, -1, stem_top + 1)
    frac = np.clip(v / stem_len, 0, 1.2)
    us = u - cap_du * frac * frac
    half = stem_w * (1 + 0.22 * (1 - frac))
    nx = np.clip(us / half, -1, 1)
    alpha = _soft(half - np.abs(us)) * _soft(v) * _soft(stem_top - v)
    streaks = 1 + 0.12 * (smooth_noise(rng, 3, 10, max(p.shape[1], 1), max(p.shape[0], 1)) - 0.5)
    under_cap = 1 - 0.5 * np.clip((v - (stem_len - 0.5 * r)) / (0.5 * r), 0, 1)
    shade = local.shade(nx, 0 * nx, np.sqrt(1 - nx * nx), 0.05)
    _over(p, np.asarray(t.stem_rgb, np.float32) * (streaks * under_cap)[..., None] * shade, alpha)

    if t.bulb:
        bw, bh = stem_w * 2.0, stem_w * 1.4
        u, v, p = part(-bw - 1, bw + 1, -bh * 0.45 - 1, bh * 1.55 + 1)
        bu, bv = u / bw, (v - bh * 0.55) / bh
        d2 = bu * bu + bv * bv
        alpha = _soft((1 - np.sqrt(d2)) * bh)
        bz = np.sqrt(np.maximum(1 - d2, 0))
        col = np.asarray(t.stem_rgb, np.float32) * 1.05 * local.shade(bu.clip(-1, 1), bv.clip(-1, 1), bz, 0.05)
        _over(p, col, alpha)

    if t.ring:
        ring_top, ring_len = stem_len * 0.8, r * 0.22
        rw = stem_w * 1.9 * 1.15 + abs(cap_du) + 1
        u, v, p = part(-rw, rw, ring_top - ring_len * 1.2 - 1, ring_top + 1)
        frac = np.clip(v / stem_len, 0, 1.2)
        us = u - cap_du * frac * frac
        depth = np.clip((ring_top - v) / ring_len, 0, 1)
        wave = 1 + 0.15 * np.sin(us * (9.0 / stem_w))
        ring_half = stem_w * (1.2 + 0.7 * depth)
        alpha = _soft(ring_half - np.abs(us)) * _soft(ring_top - v) * _soft(v - (ring_top - ring_len * wave))
        rx_ = np.clip(us / ring_half, -1, 1)
        ring_rgb = np.asarray(t.stem_rgb, np.float32) * 0.4 + 0.55
        shade = local.shade(rx_, -0.3 + 0 * rx_, np.sqrt(1 - rx_ * rx_), 0.0)
        _over(p, ring_rgb * (0.85 + 0.15 * (1 - depth))[..., None] * shade, alpha)

    # cap: a surface of revolution with the species' profile; its normal comes from the profile's slope
    u, v, p = part(cap_du - r * 1.15 - 1, cap_du + r * 1.15 + 1, stem_len - 1, stem_len + cap_h * r + 1)
    tc = v - stem_len
    tau = tc / (cap_h * r)
    tau_c = np.clip(tau, 0, 0.999)
    half = r * profile(tau_c)
    uc = u - cap_du
    alpha = _soft(half - np.abs(uc)) * _soft(tc) * _soft(cap_h * r - tc)
    slope = (profile(np.minimum(tau_c + 0.01, 1.0)) - profile(np.maximum(tau_c - 0.01, 0.0))) / (0.02 * cap_h)
    n_rad = 1 / np.sqrt(1 + slope * slope)
    sx = np.clip(uc / np.maximum(half, 0.5), -1, 1)
    a = np.arcsin(sx) * (2 / np.pi)
    if t.cap_shape == "funnel":
        # the outside of a funnel is its ridged, gill-coloured underside, turning to cap colour at the rim
        ridges = 1 - 0.3 * (0.5 + 0.5 * np.cos(a * 40)) ** 2
        albedo = np.asarray(t.gill_rgb, np.float32) * ridges[..., None]
        _over(albedo, np.asarray(t.cap_rgb, np.float32), np.clip((tau - 0.55) * 3, 0, 1))
    else:
        albedo = _cap_albedo(t, rng, a, tau_c)
    _over(p, albedo * local.shade(sx * n_rad, -slope * n_rad, np.sqrt(1 - sx * sx) * n_rad, t.gloss), alpha)

    if t.cap_shape == "funnel":
        # the cup's inside seen from above: an ellipse at the rim, darker towards the hollow centre
        rx, ry = r * float(profile(np.float32(1.0))), r * body.top_view
        rim = stem_len + cap_h * r
        u, v, p = part(cap_du - rx - 1, cap_du + rx + 1, rim - ry - 1, rim + ry + 1)
        eu, ev = (u - cap_du) / rx, (v - rim) / ry
        rho = np.sqrt(eu * eu + ev * ev)
        alpha = _soft((1 - rho) * ry)
        albedo = _cap_albedo(t, rng, np.clip(eu, -1, 1), 1 - np.clip(rho, 0, 1))
        shade = local.shade(-eu * 0.5, 0.8 + 0 * eu, 0.3 - ev * 0.3, t.gloss * 0.5)
        _over(p, albedo * (0.55 + 0.45 * rho)[..., None] * shade, alpha)

    img[y0:y1, x0:x1] = (np.clip(patch, 0, 1) * 255 + 0.5).astype(np.uint8)


@lru_cache(maxsize=16)
def _vignette(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return ((xx / width - 0.5) ** 2 + (yy / height - 0.5) ** 2) * 2


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """Fixed Gaussian grain (from its own constant seed); each photo reads it at a random offset."""
    return np.random.default_rng(12345).standard_normal((1024, 1024), dtype=np.float32)


def _sensor_noise(photo: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    """Luminance grain of strength sigma (in 0..255 levels)."""
    w, h = photo.size
    bank = _noise_bank()
    if h > bank.shape[0] or w > bank.shape[1]:
        grain = rng.standard_normal((h, w), dtype=np.float32)
    else:
        oy, ox = int(rng.integers(0, bank.shape[0] - h + 1)), int(rng.integers(0, bank.shape[1] - w + 1))
        grain = bank[oy:oy + h, ox:ox + w]
    pixels = np.asarray(photo, np.int16) + (grain * sigma).astype(np.int16)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _layout(t: Traits, rng: np.random.Generator, width: int, height: int) -> list[Body]:
    """1–3 fruit bodies near each other; the nearer (lower) ones bigger; every one fits in the frame."""
    count = 1 + int(rng.random() < t.cluster) + int(rng.random() < t.cluster * 0.6)
    cap_h = CAP_PROFILES[t.cap_shape][0]
    short = min(width, height)
    x0, y0 = rng.uniform(0.3, 0.7) * width, rng.uniform(0.62, 0.92) * height
    bodies = []
    for i in range(count):
        x = x0 if i == 0 else x0 + rng.uniform(-0.3, 0.3) * width
        y = y0 if i == 0 else y0 + rng.uniform(-0.12, 0.06) * height
        y = min(y, 0.95 * height)
        scale = (1.0 if i == 0 else rng.uniform(0.45, 0.95)) * (0.75 + 0.5 * y / height)
        radius = short * rng.uniform(0.11, 0.22) * t.size * scale
        radius = min(radius, (y - 0.04 * height) / (t.stem_length + cap_h + 0.1), 0.45 * short)
        x = float(np.clip(x, radius, width - radius))
        bodies.append(Body(x=x, y=y, radius=max(radius, 3.0), tilt=rng.normal(0, 0.12), bend=rng.normal(0, 0.5),
                           gill_view=rng.uniform(0.0, 0.3), top_view=rng.uniform(0.12, 0.4)))
    return sorted(bodies, key=lambda b: b.y)


def _shadows(bodies: list[Body], t: Traits, light: Light, width: int, height: int, strength: float,
             out_w: int, out_h: int) -> np.ndarray:
    """Soft ground shadows (drawn at quarter resolution, blurred, resized to out): 0 = lit, 1 = full shadow."""
    q = 4
    canvas = Image.new("L", (max(width // q, 1), max(height // q, 1)), 0)
    draw = ImageDraw.Draw(canvas)
    lx = float(light.direction[0])
    for b in bodies:
        cx = (b.x - lx * b.radius * (0.6 + t.stem_length * 0.4)) / q
        cy = (b.y + b.radius * 0.05) / q
        rw, rh = b.radius * (1.1 + abs(lx) * t.stem_length * 0.4) / q, b.radius * 0.3 / q
        draw.ellipse([cx - rw, cy - rh, cx + rw, cy + rh], fill=int(255 * strength))
        draw.ellipse([(b.x - b.radius * t.stem_thickness * 2) / q, cy - rh * 0.5,
                      (b.x + b.radius * t.stem_thickness * 2) / q, cy + rh * 0.5], fill=255)
    canvas = canvas.filter(ImageFilter.GaussianBlur(max(min(b.radius for b in bodies) / q * 0.35, 1.0)))
    return np.asarray(canvas.resize((out_w, out_h), Image.BILINEAR), np.float32) * (1 / 255)


def _blades(img: Image.Image, rng: np.random.Generator, bodies: list[Body]) -> None:
    """A few sharp grass blades in front of the fruit bodies' bases: partial occlusion, as in the field."""
    draw = ImageDraw.Draw(img)
    w, h = img.size
    for b in bodies:
        for _ in range(int(rng.integers(2, 7))):
            x = b.x + rng.normal(0, b.radius * 1.2)
            length = b.radius * rng.uniform(0.5, 2.0)
            lean = rng.normal(0, 0.3) * length
            base_y = min(b.y + rng.uniform(0, 0.15) * b.radius, h - 1)
            green = np.asarray(GRASS_GREENS[int(rng.integers(len(GRASS_GREENS)))]) * rng.uniform(0.7, 1.4)
            fill = tuple(int(c) for c in np.clip(green * 255, 0, 255))
            pts = [(x, base_y), (x + lean * 0.4, base_y - length * 0.55), (x + lean, base_y - length)]
            draw.line(pts, fill=fill, width=max(1, int(b.radius / 14)))


def render_photo(t: Traits, rng: np.random.Generator, size: int = 256, jpeg_quality: tuple[int, int] = (70, 95),
                 *, fast: bool = True) -> bytes:
    """A JPEG (RGB) of a species with traits `t`; the longest side is `size` px. Deterministic given rng.

    `fast=False` is the straightforward version kept as the benchmark's baseline: the ground at full
    resolution and every fruit-body part computed over the whole frame.
    """
    aspect = rng.choice([1.0, 4 / 3, 3 / 4], p=[0.5, 0.25, 0.25])
    width, height = (size, max(int(round(size / aspect)), 16)) if aspect >= 1 else (max(int(round(size * aspect)), 16), size)
    ground = t.habitat if rng.random() < 0.6 else str(rng.choice([h for h in HABITATS if h != t.habitat]))
    light = _sample_light(rng)
    bodies = _layout(t, rng, width, height)

    # The ground is rendered at half resolution: it ends up out of focus behind sharp mushrooms anyway
    # (depth of field), so upsampling costs no realism and saves three quarters of its work.
    bw, bh = (max(width // 2, 8), max(height // 2, 8)) if fast else (width, height)
    gains = rng.uniform(0.9, 1.1, 3).astype(np.float32)  # white balance, applied through the light
    light = Light(direction=light.direction, colour=light.colour * gains, ambient=light.ambient * gains)
    bg = background(ground, rng, bw, bh)
    ramp = 1 + np.linspace(-0.15, 0.15, bw, dtype=np.float32)[None, :] * float(light.direction[0])
    lit = ramp * (1 - 0.65 * _shadows(bodies, t, light, width, height, rng.uniform(0.4, 0.8), bw, bh))
    lit *= 1 - rng.uniform(0.0, 0.35) * _vignette(bw, bh)
    bg *= (light.ambient * 1.3 + light.colour * 0.55)
    bg *= lit[..., None]
    ground_img = Image.fromarray((np.clip(bg, 0, 1) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    ground_img = ground_img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2) * size / 256))
    img = np.array(ground_img)

    for body in bodies:
        draw_body(img, body, t, light, rng, crop_to_parts=fast)

    photo = Image.fromarray(img)
    if ground == "grass" or rng.random() < 0.3:
        _blades(photo, rng, bodies)
    if rng.random() < 0.4:
        photo = photo.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2) * size / 256))
    photo = _sensor_noise(photo, rng, rng.uniform(0.5, 6.0))
    buf = io.BytesIO()
    lo, hi = int(jpeg_quality[0]), int(jpeg_quality[1])
    photo.save(buf, format="JPEG", quality=int(rng.integers(lo, hi + 1)))
    return buf.getvalue()
