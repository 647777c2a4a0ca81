"""Procedural renderer of the synthetic three-modality person set (`synthetic_mm`).

Every identity is a small set of attributes that survives every modality: body shape (height,
girth, head size, leg length, trousers or shorts), the geometry of the upper and lower clothing
patterns (stripes, checks, diagonals, blocks, with their period and phase) and a carried object
(backpack, bag, hat). What defeats raw-pixel matching lives in the rendering of each modality:

- ``rgb``: clothing colours and texture, under per-image illumination and colour cast, on a
  cluttered background that belongs to the camera.
- ``ir``: a thermal rendering: skin hot, clothing at a temperature that changes from capture to
  capture (so it identifies nobody), the pattern as a thermal texture, no colour; the camera
  picks the background temperature and the polarity (white-hot or black-hot).
- ``depth``: a distance map: the silhouette (with the carried object) in front of a floor and
  wall whose geometry belongs to the camera, the pattern as a shallow relief.

A tuple is a pixel-aligned capture of the same instant by one camera in all three modalities
(same pose, scale and position). ``difficulty`` in [0, 1] scales every nuisance: noise,
illumination range, background clutter, position and scale jitter, and the chance of an
inverted infrared polarity.
"""

from __future__ import annotations

import dataclasses

import numpy as np

MODALITIES: tuple[str, ...] = ("rgb", "ir", "depth")

_NUM_UPPER_PATTERNS = 6
_NUM_LOWER_PATTERNS = 3
_NUM_OBJECTS = 5  # none, backpack, bag on the left, bag on the right, hat


@dataclasses.dataclass(frozen=True)
class Identity:
  """Attributes of one synthetic person; all lengths are fractions of the image size."""

  height: float
  girth: float
  head: float
  leg_fraction: float
  shorts: bool
  upper_pattern: int
  upper_period: float
  upper_phase: float
  lower_pattern: int
  lower_period: float
  upper_colors: np.ndarray  # (2, 3) in [0, 1]
  lower_colors: np.ndarray  # (2, 3)
  skin: np.ndarray  # (3,)
  carried: int


@dataclasses.dataclass(frozen=True)
class Camera:
  """Per-camera rendering nuisances (background, light, sensor)."""

  rgb_background: np.ndarray  # (2, 3) top and bottom colours of the gradient
  clutter: np.ndarray  # (K, 7): y0, x0, y1, x1 fractions and an RGB colour
  ir_background: float
  ir_inverted: bool
  depth_wall: float
  depth_floor_slope: float
  scale: float
  light: float


def sample_identity(rng: np.random.Generator) -> Identity:
  """Draws one identity's attributes."""
  def contrasting_pair() -> np.ndarray:
    """Two colours far apart in every channel, so the pattern shows under any light."""
    base = rng.uniform(0.05, 0.95, size=3)
    return np.stack([base, np.where(base > 0.5, base - 0.45, base + 0.45)])

  return Identity(
      height=float(rng.uniform(0.72, 0.94)),
      girth=float(rng.uniform(0.42, 0.80)),
      head=float(rng.uniform(0.07, 0.11)),
      leg_fraction=float(rng.uniform(0.40, 0.55)),
      shorts=bool(rng.random() < 0.35),
      upper_pattern=int(rng.integers(_NUM_UPPER_PATTERNS)),
      upper_period=float(rng.choice([0.20, 0.28, 0.40])),
      upper_phase=float(rng.uniform(0.0, 1.0)),
      lower_pattern=int(rng.integers(_NUM_LOWER_PATTERNS)),
      lower_period=float(rng.choice([0.25, 0.40])),
      upper_colors=contrasting_pair(),
      lower_colors=contrasting_pair(),
      skin=np.array([0.85, 0.65, 0.5]) * rng.uniform(0.5, 1.1),
      carried=int(rng.integers(_NUM_OBJECTS)),
  )


def sample_camera(rng: np.random.Generator, difficulty: float) -> Camera:
  """Draws one camera's background and sensor characteristics."""
  num_clutter = int(round(2 + 8 * difficulty))
  y0 = rng.uniform(0, 0.9, num_clutter)
  x0 = rng.uniform(0, 0.9, num_clutter)
  clutter = np.stack([
      y0, x0, y0 + rng.uniform(0.05, 0.4, num_clutter), x0 + rng.uniform(0.05, 0.5, num_clutter),
      *rng.uniform(0, 1, (3, num_clutter))], axis=1)
  return Camera(
      rgb_background=rng.uniform(0.1, 0.9, size=(2, 3)),
      clutter=clutter,
      ir_background=float(rng.uniform(0.05, 0.45)),
      ir_inverted=bool(rng.random() < 0.5 * difficulty),
      depth_wall=float(rng.uniform(0.05, 0.3)),
      depth_floor_slope=float(rng.uniform(0.2, 0.6)),
      scale=float(rng.uniform(0.9, 1.05)),
      light=float(rng.uniform(0.7, 1.2)),
  )


def _pattern(kind: int, u: np.ndarray, v: np.ndarray, period: float, phase: float) -> np.ndarray:
  """Binary clothing pattern in body coordinates (u across, v down), values in {0, 1}."""
  if kind == 0:
    return np.zeros_like(u)
  if kind == 1:  # horizontal stripes
    return (np.floor(v / period + phase) % 2).astype(np.float32)
  if kind == 2:  # vertical stripes
    return (np.floor(u / period + phase) % 2).astype(np.float32)
  if kind == 3:  # checks
    return ((np.floor(u / period + phase) + np.floor(v / period)) % 2).astype(np.float32)
  if kind == 4:  # diagonal stripes
    return (np.floor((u + v) / period + phase) % 2).astype(np.float32)
  return (v > 0.5).astype(np.float32)  # two-tone block: top half and bottom half differ


def render_tuple(identity: Identity, camera: Camera, height: int, width: int,
                 rng: np.random.Generator, difficulty: float) -> dict[str, np.ndarray]:
  """Renders one pixel-aligned capture of `identity` by `camera`.

  Returns:
    A dict from modality name to a uint8 image of shape (height, width, 3); infrared and depth
    are grey images replicated over the three channels.
  """
  jitter = 0.04 + 0.10 * difficulty
  scale = camera.scale * rng.uniform(1 - jitter, 1 + jitter)
  center_x = 0.5 + rng.uniform(-jitter, jitter)
  mirrored = rng.random() < 0.5
  y, x = np.meshgrid((np.arange(height) + 0.5) / height, (np.arange(width) + 0.5) / width,
                     indexing="ij")
  dx = (x - center_x) * (-1 if mirrored else 1)

  body_h = identity.height * scale
  top = 0.97 - body_h
  head_r = identity.head * scale
  neck = top + 2 * head_r
  waist = neck + (body_h - 2 * head_r) * (1 - identity.leg_fraction)
  feet = top + body_h
  half_w = 0.5 * identity.girth * scale * 0.55  # torso half-width as a fraction of width

  head = ((dx * width / height) ** 2 + (y - top - head_r) ** 2) < head_r ** 2
  torso = (np.abs(dx) < half_w) & (y >= neck) & (y < waist)
  arms = (np.abs(dx) >= half_w) & (np.abs(dx) < half_w * 1.35) & (y >= neck + 0.01) & (
      y < waist + 0.05)
  legs = (np.abs(dx) < half_w * 0.9) & (np.abs(dx) > half_w * 0.12) & (y >= waist) & (y < feet)
  upper = torso | arms
  lower_cloth = legs & (y < (waist + 0.45 * (feet - waist) if identity.shorts else feet))
  leg_skin = legs & ~lower_cloth

  carried = np.zeros_like(head)
  if identity.carried == 1:  # backpack: a block sticking out on one side of the torso
    carried = (dx > -half_w * 1.9) & (dx < -half_w * 0.9) & (y > neck + 0.03) & (
        y < neck + 0.55 * (waist - neck) + 0.08)
  elif identity.carried in (2, 3):  # bag held low on one side
    side = 1 if identity.carried == 2 else -1
    carried = (side * dx > half_w * 1.3) & (side * dx < half_w * 2.3) & (y > waist - 0.02) & (
        y < waist + 0.14)
  elif identity.carried == 4:  # hat: a wide brim above the head
    carried = (np.abs(dx) < head_r * 2.6 * height / width) & (y > top - 0.035) & (y < top + 0.01)
  person = head | upper | legs | carried

  u = (dx + half_w) / (2 * half_w)
  v_upper = (y - neck) / max(waist - neck, 1e-3)
  v_lower = (y - waist) / max(feet - waist, 1e-3)
  upper_pat = _pattern(identity.upper_pattern, u, v_upper, identity.upper_period,
                       identity.upper_phase)
  lower_pat = _pattern(identity.lower_pattern, u, v_lower, identity.lower_period, 0.0)
  skin = head | leg_skin

  noise_sigma = 0.02 + 0.06 * difficulty

  # RGB: colours on a camera background under this image's light.
  bg_t = y[..., None]
  rgb = (1 - bg_t) * camera.rgb_background[0] + bg_t * camera.rgb_background[1]
  for y0, x0, y1, x1, *col in camera.clutter:
    rgb = np.where(((y >= y0) & (y < y1) & (x >= x0) & (x < x1))[..., None], np.array(col), rgb)
  upper_rgb = np.where(upper_pat[..., None] > 0, identity.upper_colors[1], identity.upper_colors[0])
  lower_rgb = np.where(lower_pat[..., None] > 0, identity.lower_colors[1], identity.lower_colors[0])
  rgb = np.where(upper[..., None], upper_rgb, rgb)
  rgb = np.where(lower_cloth[..., None], lower_rgb, rgb)
  rgb = np.where(skin[..., None], identity.skin, rgb)
  rgb = np.where(carried[..., None], np.array([0.25, 0.2, 0.15]), rgb)
  light_range = 0.15 + 0.35 * difficulty
  light = camera.light * rng.uniform(1 - light_range, 1 + light_range)
  cast = 1 + rng.uniform(-0.5, 0.5, size=3) * light_range
  rgb = rgb * light * cast + rng.normal(0, noise_sigma, rgb.shape)

  # Infrared: heat, no colour; the pattern is a weak thermal texture.
  ir = camera.ir_background + 0.15 * y + rng.normal(0, 0.04, size=1) * difficulty
  upper_heat, lower_heat = rng.uniform(0.35, 0.75, size=2)
  ir = np.where(upper, upper_heat + 0.3 * (upper_pat - 0.5), ir)
  ir = np.where(lower_cloth, lower_heat + 0.3 * (lower_pat - 0.5), ir)
  ir = np.where(skin, 0.95, ir)
  ir = np.where(carried, 0.25, ir)
  if camera.ir_inverted:
    ir = 1.0 - ir
  ir = ir + rng.normal(0, noise_sigma, ir.shape)

  # Depth: nearer is brighter; floor and wall from the camera, pattern as shallow relief.
  distance = rng.uniform(0.55, 0.75)
  depth = np.where(y > 0.6, camera.depth_wall + camera.depth_floor_slope * (y - 0.6),
                   camera.depth_wall)
  body_relief = distance + 0.12 * (1 - np.clip(np.abs(dx) / max(half_w, 1e-3), 0, 1.5))
  relief = 0.1 * np.where(upper, upper_pat, np.where(lower_cloth, lower_pat, 0.0))
  depth = np.where(person, body_relief + relief, depth)
  depth = np.where(carried, distance + 0.2, depth)
  depth = depth + rng.normal(0, noise_sigma, depth.shape)

  def to_uint8(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)

  return {"rgb": to_uint8(rgb), "ir": to_uint8(ir), "depth": to_uint8(depth)}


@dataclasses.dataclass(frozen=True)
class SyntheticRecord:
  """One rendered image and its labels."""

  image: np.ndarray  # (H, W, 3) uint8
  pid: int
  camid: int
  modality: int
  tuple_id: int
  path: str


def generate_split(pids: range, num_cameras: int, tuples_per_camera: int, height: int,
                   width: int, seed: int, difficulty: float,
                   tuple_filter=lambda tuple_index: True):
  """Yields the records of the identities `pids`, deterministic for (seed, pid, camera, tuple).

  Identity attributes depend on (seed, pid) only, camera nuisances on (seed, camera) only, and
  each tuple's pose and noise on (seed, pid, camera, tuple index), so a split renders the same
  way whatever other splits or orders are generated.
  """
  cameras = [sample_camera(np.random.default_rng([seed, 1, c]), difficulty)
             for c in range(num_cameras)]
  for pid in pids:
    identity = sample_identity(np.random.default_rng([seed, 0, pid]))
    for camid, camera in enumerate(cameras):
      for t in range(tuples_per_camera):
        if not tuple_filter(t):
          continue
        rng = np.random.default_rng([seed, 2, pid, camid, t])
        images = render_tuple(identity, camera, height, width, rng, difficulty)
        tuple_id = (pid * num_cameras + camid) * tuples_per_camera + t
        for modality, name in enumerate(MODALITIES):
          yield SyntheticRecord(
              image=images[name], pid=pid, camid=camid, modality=modality, tuple_id=tuple_id,
              path=f"{name}/{pid:04d}_c{camid}_t{t:02d}.png")
