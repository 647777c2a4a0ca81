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

Each capture also has a scene condition (`CONDITIONS`), in which one sensor fails as it does
outdoors, the others unchanged:

- ``clear``: the rendering above.
- ``night``: RGB dark (white at 15-30% of the range), shot noise of 6 to 15 photons at
  white, a sixth of the colour saturation, read noise.
- ``overexposed``: RGB with a gain of 2.5 to 4 and a veil of glare: most colours saturate.
- ``thermal_crossover``: the surroundings as warm as the body; the infrared contrast of the
  person against the background falls to 4-12% of its clear value, under the sensor noise.
- ``depth_dropout``: a structured-light depth map: holes in the projector's shadow beside the
  silhouette, in blobs and on far surfaces, range noise growing with the squared distance,
  coarse disparity steps.
- ``occluded``: a low barrier over the lower body or a pillar across it, at the same pixels in
  every modality: a coloured object in RGB, at ambient temperature in infrared, nearer than the
  person in depth.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

MODALITIES: tuple[str, ...] = ("rgb", "ir", "depth")

_NUM_UPPER_PATTERNS = 6
_NUM_LOWER_PATTERNS = 3
_NUM_OBJECTS = 5  # none, backpack, bag on the left, bag on the right, hat

# Scene conditions of a capture, and the modality each one degrades (None: all alike).
CONDITIONS: tuple[str, ...] = ("clear", "night", "overexposed", "thermal_crossover",
                               "depth_dropout", "occluded")
DEGRADED_MODALITY: dict[str, str | None] = {
    "clear": None, "night": "rgb", "overexposed": "rgb", "thermal_crossover": "ir",
    "depth_dropout": "depth", "occluded": None}


def check_conditions(mix: Mapping[str, float], where: str) -> tuple[tuple[str, float], ...]:
  """A mix of scene conditions as sorted (name, probability) pairs, checked.

  Args:
    mix: {condition name: probability}.
    where: what to name in an error (e.g. "config.data.conditions").

  Raises:
    ValueError: an unknown name, a negative probability, or probabilities that do not sum to 1.
  """
  unknown = sorted(set(mix) - set(CONDITIONS))
  if unknown:
    raise ValueError(f"{where}: unknown scene condition(s) {unknown}; expected names among "
                     f"{list(CONDITIONS)}.")
  if not mix or any(float(p) < 0 for p in mix.values()):
    raise ValueError(f"{where}={dict(mix)}: expected non-negative probabilities of conditions "
                     f"among {list(CONDITIONS)}.")
  total = sum(float(p) for p in mix.values())
  if abs(total - 1.0) > 1e-6:
    raise ValueError(f"{where}={dict(mix)}: the probabilities sum to {total:.6g}, expected 1 "
                     f"(conditions: {list(CONDITIONS)}).")
  return tuple((name, float(mix[name])) for name in CONDITIONS if name in mix)


def draw_condition(mix: Sequence[tuple[str, float]], rng: np.random.Generator) -> str:
  """One condition drawn from `mix` ((name, probability) pairs, `check_conditions`)."""
  if len(mix) == 1:
    return mix[0][0]
  names = [name for name, _ in mix]
  probabilities = np.array([p for _, p in mix])
  return names[int(rng.choice(len(names), p=probabilities / probabilities.sum()))]


@dataclasses.dataclass(frozen=True)
class Occluder:
  """An object between the camera and the person, the same pixels in every modality.

  Attributes:
    mask: (H, W) bool, the pixels it hides.
    color: (3,) its RGB reflectance.
    shading: (H, W) a soft gradient over it (texture, in every modality).
    nearer: how much nearer the camera than the person it stands (depth units).
  """

  mask: np.ndarray
  color: np.ndarray
  shading: np.ndarray
  nearer: float


def _occluder(rng: np.random.Generator, y: np.ndarray, x: np.ndarray, top: float, feet: float,
              center_x: float, half_w: float) -> Occluder:
  """A low barrier hiding the lower body (a bench, a car) or a pillar across part of it."""
  if rng.random() < 0.5:
    edge = top + rng.uniform(0.45, 0.7) * (feet - top)
    mask = y >= edge
    shading = 0.8 + 0.2 * np.cos(x * rng.uniform(8, 20))
  else:
    band = rng.uniform(0.5, 0.9) * half_w
    middle = center_x + rng.uniform(-0.8, 0.8) * half_w
    mask = np.abs(x - middle) < band
    shading = 0.8 + 0.2 * np.cos(y * rng.uniform(8, 20))
  return Occluder(mask=mask, color=rng.uniform(0.15, 0.85, size=3), shading=shading,
                  nearer=float(rng.uniform(0.15, 0.3)))


def _night(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A dark RGB exposure: few photons per pixel (shot noise), little colour, read noise."""
  grey = rgb.mean(axis=-1, keepdims=True)
  faint_colour = grey + 0.15 * (rgb - grey)
  photons = rng.uniform(6.0, 15.0)  # expected photo-electrons of a white pixel
  level = rng.uniform(0.15, 0.3)  # the exposure's brightest value
  counts = rng.poisson(np.clip(faint_colour, 0, None) * photons)
  return counts / photons * level + rng.normal(0, 0.015, rgb.shape)


def _overexposed(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """RGB against the light: a gain that saturates most colours and a veil of glare."""
  return rgb * rng.uniform(2.5, 4.0) + rng.uniform(0.15, 0.35)


def _depth_dropout(depth: np.ndarray, person: np.ndarray, y: np.ndarray, x: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
  """A structured-light depth map: holes (no reading, 0) in the projector's shadow beside the
  silhouette, in blobs where the pattern is lost, and on far surfaces; range noise growing with
  the square of the distance; coarse disparity steps."""
  height, width = depth.shape
  shift = max(1, int(round(width * rng.uniform(0.04, 0.1))))
  shadow = np.roll(person, shift if rng.random() < 0.5 else -shift, axis=1) & ~person
  blobs = np.zeros_like(person)
  for _ in range(int(rng.integers(3, 7))):
    cy, cx = rng.uniform(0, 1, size=2)
    ry, rx = rng.uniform(0.04, 0.14, size=2)
    blobs |= ((y - cy) / ry) ** 2 + ((x - cx) / (rx * height / width)) ** 2 < 1
  far = (depth < 0.2) & (rng.random(depth.shape) < 0.3)
  distance = 1.0 - np.clip(depth, 0, 1)
  noisy = depth + rng.normal(0, 1, depth.shape) * (0.01 + 0.08 * distance ** 2)
  stepped = np.round(noisy * 24) / 24
  return np.where(shadow | blobs | far, 0.0, stepped)


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
                 rng: np.random.Generator, difficulty: float, condition: str = "clear",
                 condition_rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """Renders one pixel-aligned capture of `identity` by `camera` in scene `condition`.

  Args:
    identity, camera: what is seen and by which camera.
    height, width: image size.
    rng: the capture's pose and sensor noise.
    difficulty: nuisance strength in [0, 1].
    condition: a `CONDITIONS` name; "clear" renders every modality as it always has.
    condition_rng: the condition's own random numbers (needed unless "clear"); `rng` is drawn
      from as in a clear scene, so the modalities a condition leaves alone are the clear ones.

  Returns:
    A dict from modality name to a uint8 image of shape (height, width, 3); infrared and depth
    are grey images replicated over the three channels.
  """
  if condition not in CONDITIONS:
    raise ValueError(f"Unknown scene condition {condition!r}; expected one of {CONDITIONS}.")
  if condition != "clear" and condition_rng is None:
    raise ValueError(f"Scene condition {condition!r} needs condition_rng.")
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
  # A scene condition draws its own numbers from `condition_rng`: `rng` is consumed exactly as
  # in a clear scene, so the modalities a condition leaves alone render as they would in one.
  occluder = (_occluder(condition_rng, y, x, top, feet, center_x, half_w)
              if condition == "occluded" else None)

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
  if occluder is not None:
    rgb = np.where(occluder.mask[..., None], occluder.color * occluder.shading[..., None], rgb)
  light_range = 0.15 + 0.35 * difficulty
  light = camera.light * rng.uniform(1 - light_range, 1 + light_range)
  cast = 1 + rng.uniform(-0.5, 0.5, size=3) * light_range
  rgb = rgb * light * cast
  rgb_noise = rng.normal(0, noise_sigma, rgb.shape)
  if condition == "night":
    rgb = _night(rgb, condition_rng)
  elif condition == "overexposed":
    rgb = _overexposed(rgb, condition_rng) + rgb_noise
  else:
    rgb = rgb + rgb_noise

  # Infrared: heat, no colour; the pattern is a weak thermal texture.
  ambient = camera.ir_background + 0.15 * y + rng.normal(0, 0.04, size=1) * difficulty
  upper_heat, lower_heat = rng.uniform(0.35, 0.75, size=2)
  ir = np.where(upper, upper_heat + 0.3 * (upper_pat - 0.5), ambient)
  ir = np.where(lower_cloth, lower_heat + 0.3 * (lower_pat - 0.5), ir)
  ir = np.where(skin, 0.95, ir)
  ir = np.where(carried, 0.25, ir)
  if condition == "thermal_crossover":
    # The surroundings are as warm as the body: what differs from the background is scaled to
    # a few per cent, under the sensor noise.
    contrast = condition_rng.uniform(0.04, 0.12)
    ir = np.where(person, ambient + contrast * (ir - ambient), ir)
  if occluder is not None:  # an unheated object at the surroundings' temperature
    ir = np.where(occluder.mask, ambient + 0.05 * occluder.shading, ir)
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
  if occluder is not None:  # in front of the person: nearer, so brighter
    depth = np.where(occluder.mask, distance + occluder.nearer, depth)
  depth = depth + rng.normal(0, noise_sigma, depth.shape)
  if condition == "depth_dropout":
    depth = _depth_dropout(depth, person, y, x, condition_rng)

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
  condition: str = "clear"


def generate_split(pids: range, num_cameras: int, tuples_per_camera: int, height: int,
                   width: int, seed: int, difficulty: float,
                   tuple_filter=lambda tuple_index: True,
                   conditions: Sequence[tuple[str, float]] = (("clear", 1.0),)):
  """Yields the records of the identities `pids`, deterministic for (seed, pid, camera, tuple).

  Identity attributes depend on (seed, pid) only, camera nuisances on (seed, camera) only, and
  each tuple's pose and noise on (seed, pid, camera, tuple index), so a split renders the same
  way whatever other splits or orders are generated. Each capture's scene condition is drawn
  from `conditions` ((name, probability) pairs, `check_conditions`) with a generator of its own,
  seeded by (seed, pid, camera, tuple index), which also draws the condition's degradation; a
  clear capture is the same whatever the mix.
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
        condition_rng = np.random.default_rng([seed, 3, pid, camid, t])
        condition = draw_condition(conditions, condition_rng)
        images = render_tuple(identity, camera, height, width, rng, difficulty, condition,
                              condition_rng)
        tuple_id = (pid * num_cameras + camid) * tuples_per_camera + t
        for modality, name in enumerate(MODALITIES):
          yield SyntheticRecord(
              image=images[name], pid=pid, camid=camid, modality=modality, tuple_id=tuple_id,
              path=f"{name}/{pid:04d}_c{camid}_t{t:02d}.png", condition=condition)
