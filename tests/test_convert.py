"""Tests for mmreid_jax.convert: torchvision ResNet weights -> Flax, checked numerically.

The weights are seeded NumPy draws in torchvision's layout (`torch_reference.py`); PyTorch's
feature maps for them are committed in tests/data/torch_resnet_reference.npz (written by
tests/make_torch_reference.py), so CI needs no torch. Where torch and torchvision are installed
the comparison also runs live. The tolerance is the issue's: 1e-4 relative L2 in float32.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import torch_reference
from mmreid_jax import convert
from mmreid_jax.models.reid import MultimodalReID
from mmreid_jax.models.resnet import ResNet

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
HAVE_TORCHVISION = (importlib.util.find_spec("torch") is not None
                    and importlib.util.find_spec("torchvision") is not None)
needs_torch = pytest.mark.skipif(not HAVE_TORCHVISION, reason="torch and torchvision not installed")


@functools.cache
def reference() -> dict[str, np.ndarray]:
  with np.load(torch_reference.REFERENCE_PATH) as data:
    return dict(data)


@functools.cache
def state_dict(depth: int) -> dict[str, np.ndarray]:
  return torch_reference.random_state_dict(depth)


@functools.cache
def flax_feature_map(depth: int) -> np.ndarray:
  """The Flax ResNet's (2, 3, 2, C) feature map with the converted seeded weights."""
  variables = convert.torchvision_resnet_variables(state_dict(depth), depth)
  model = ResNet(depth=depth, last_stride=2)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables,
                                                             torch_reference.random_input())
  return np.asarray(out)


@pytest.mark.parametrize("depth", torch_reference.DEPTHS)
def test_matches_committed_pytorch_reference(depth: int):
  """The converted weights give PyTorch's feature map (committed outputs, no torch needed)."""
  ref = reference()
  images = torch_reference.random_input().astype(np.float64)
  np.testing.assert_allclose(ref["input_fingerprint"], [images.sum(), np.square(images).sum()],
                             rtol=1e-12)
  # Same weights as those the reference was computed with (a changed generator fails here,
  # not as a conversion error).
  np.testing.assert_allclose(torch_reference.fingerprint(state_dict(depth)),
                             ref[f"fingerprint_{depth}"], rtol=1e-12)
  expected = ref[f"features_{depth}"]
  channels = 2048 if depth >= 50 else 512
  assert expected.shape == (2, 3, 2, channels)
  out = flax_feature_map(depth)
  assert out.shape == expected.shape and out.dtype == np.float32
  error = torch_reference.relative_error(out, expected)
  print(f"ResNet-{depth}: relative L2 error {error:.2e}")
  assert error < TOLERANCE
  # The reference is not degenerate: activations vary and ReLU zeroes only part of them.
  assert 0.05 < np.mean(expected == 0) < 0.6 and np.std(expected) > 0.5


@pytest.fixture(scope="module")
def live_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
  """tests/make_torch_reference.py run now, in a process of its own (torchvision must not be
  imported after TensorFlow), writing to a temporary file."""
  path = tmp_path_factory.mktemp("torch") / "live.npz"
  result = subprocess.run([sys.executable, str(ROOT / "tests" / "make_torch_reference.py"),
                           "--output", str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(path) as data:
    return dict(data)


@needs_torch
@pytest.mark.parametrize("depth", torch_reference.DEPTHS)
def test_matches_pytorch_live(depth: int, live_reference: dict[str, np.ndarray]):
  """PyTorch now (torchvision's `resnet{depth}` loaded with strict=True: the generator's names
  and shapes are exactly torchvision's) reproduces the committed reference, and the Flax
  network matches it."""
  np.testing.assert_array_equal(live_reference[f"fingerprint_{depth}"],
                                reference()[f"fingerprint_{depth}"])
  live = live_reference[f"features_{depth}"]
  assert torch_reference.relative_error(live, reference()[f"features_{depth}"]) < 1e-5
  assert torch_reference.relative_error(flax_feature_map(depth), live) < TOLERANCE


def test_safetensors_file_equals_in_memory(tmp_path: Path):
  tensors = state_dict(18)
  path = tmp_path / "resnet18.safetensors"
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
  from_file = convert.torchvision_resnet_variables(path, 18)
  from_dict = convert.torchvision_resnet_variables(tensors, 18)
  assert set(from_file) == {"params", "batch_stats"}
  jax.tree.map(np.testing.assert_array_equal, from_file, from_dict)
  # Layout: torch (O, I, kh, kw) -> Flax (kh, kw, I, O); running statistics -> batch_stats.
  np.testing.assert_array_equal(from_dict["params"]["layer2_0"]["downsample_conv"]["kernel"],
                                tensors["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(from_dict["batch_stats"]["layer4_1"]["bn2"]["var"],
                                tensors["layer4.1.bn2.running_var"])
  np.testing.assert_array_equal(from_dict["params"]["bn1"]["scale"], tensors["bn1.weight"])


@needs_torch
def test_pth_file_and_torch_tensors(tmp_path: Path):
  import torch

  tensors = state_dict(34)
  as_torch = {k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}
  path = tmp_path / "resnet34.pth"
  torch.save(as_torch, path)
  expected = convert.torchvision_resnet_variables(tensors, 34)
  jax.tree.map(np.testing.assert_array_equal, convert.torchvision_resnet_variables(path, 34),
               expected)
  jax.tree.map(np.testing.assert_array_equal, convert.torchvision_resnet_variables(as_torch, 34),
               expected)


def _bad(tensors: dict[str, np.ndarray], **changes) -> dict[str, np.ndarray]:
  bad = dict(tensors)
  for name, value in changes.items():
    name = name.replace("__", ".")
    if value is None:
      del bad[name]
    else:
      bad[name] = value
  return bad


def test_pth_without_torch_says_how_to_convert(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
  (tmp_path / "w.pth").write_bytes(b"")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(ImportError, match=r"mmreid-jax\[torch\].*--output FILE\.safetensors"):
    convert.torchvision_resnet_variables(tmp_path / "w.pth", 18)


def test_unknown_missing_and_misshaped_tensors_are_named():
  tensors = state_dict(18)
  with pytest.raises(ValueError, match=r"missing tensors: layer3\.1\.bn2\.running_var"):
    convert.torchvision_resnet_variables(_bad(tensors, layer3__1__bn2__running_var=None), 18)
  with pytest.raises(ValueError, match=r"unknown tensors: layer5\.0\.conv1\.weight"):
    convert.torchvision_resnet_variables(
        _bad(tensors, layer5__0__conv1__weight=np.zeros((3, 3))), 18)
  with pytest.raises(ValueError, match=r"mis-shaped tensors: conv1\.weight \(64, 3, 5, 5\) "
                                       r"\(expected \(64, 3, 7, 7\)\)"):
    convert.torchvision_resnet_variables(
        _bad(tensors, conv1__weight=np.zeros((64, 3, 5, 5), np.float32)), 18)
  # All problems at once, in one message.
  with pytest.raises(ValueError) as error:
    convert.torchvision_resnet_variables(
        _bad(tensors, bn1__bias=None, extra=np.zeros(1),
             fc__weight=np.zeros(1)), 18)  # fc is ignored whatever its shape
  message = str(error.value)
  assert "missing tensors: bn1.bias" in message and "unknown tensors: extra" in message
  assert "fc.weight" not in message and "ResNet-18" in message
  # A ResNet-50 checkpoint is not a ResNet-101: the missing blocks are named.
  with pytest.raises(ValueError, match=r"missing tensors: layer3\.6\.conv1\.weight"):
    convert.torchvision_resnet_variables(state_dict(50), 101)


def test_unsupported_depth_and_file_type(tmp_path: Path):
  with pytest.raises(ValueError, match="depth=152"):
    convert.torchvision_resnet_variables(state_dict(18), 152)
  (tmp_path / "w.npz").write_bytes(b"")
  with pytest.raises(ValueError, match=r"unknown type '\.npz'"):
    convert.torchvision_resnet_variables(tmp_path / "w.npz", 18)
  with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
    convert.torchvision_resnet_variables(tmp_path / "nothing.safetensors", 18)


@pytest.mark.parametrize("depth", torch_reference.DEPTHS)
def test_infer_architecture(depth: int):
  for width in (64, 16):
    tensors = {name: np.broadcast_to(np.float32(0), shape)  # views: no memory
               for name, shape in torch_reference.torchvision_shapes(depth, width).items()}
    assert convert.infer_architecture(tensors) == (depth, width)
  last = max(int(k.split(".")[1]) for k in tensors if k.startswith("layer4."))
  with pytest.raises(ValueError, match=rf"Blocks per stage \(\d+, \d+, \d+, {last}\)"):
    convert.infer_architecture({k: v for k, v in tensors.items()
                                if not k.startswith(f"layer4.{last}.")})


def test_command_line_writes_the_backbone(tmp_path: Path):
  """`python -m mmreid_jax.convert` (a .pth input where torch is installed, else .safetensors)
  writes float32 backbone tensors under torchvision's names, without fc and counters."""
  tensors = state_dict(18)
  if HAVE_TORCHVISION:
    import torch

    source = tmp_path / "resnet18.pth"
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()}, source)
  else:
    source = tmp_path / "resnet18.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(source))
  output = tmp_path / "out" / "resnet18.safetensors"
  result = subprocess.run([sys.executable, "-m", "mmreid_jax.convert", "--input", str(source),
                           "--output", str(output)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ResNet-18 (width 64)" in result.stdout
  written = load_file(str(output))
  expected = {k: v for k, v in tensors.items() if not convert.IGNORED_TENSORS.search(k)}
  assert written.keys() == expected.keys()
  for name, value in expected.items():
    assert written[name].dtype == np.float32
    np.testing.assert_array_equal(written[name], value, err_msg=name)
  # The wrong depth is refused with the tensors named, and nothing is written (in-process).
  refused = tmp_path / "refused.safetensors"
  with pytest.raises(ValueError, match=r"missing tensors: layer1\.2\.conv1\.weight"):
    convert.main(["--input", str(source), "--output", str(refused), "--depth", "34"])
  assert not refused.exists()
  with pytest.raises(ValueError, match="ending in .safetensors"):
    convert.main(["--input", str(source), "--output", str(tmp_path / "x.pth")])


# ---------------------------------------------------------------- into the ReID network


def _reid_variables(specific_stages: int, width: int = 8) -> dict:
  """Shapes-only variables of a three-modality MultimodalReID (ResNet-18), as zeros."""
  model = MultimodalReID(num_classes=5, num_modalities=3, depth=18, width=width,
                         specific_stages=specific_stages, embed_dim=8, part_dim=4,
                         attention_dim=8)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 3, 32, 16, 3)), jnp.ones((1, 3), bool), (0, 1, 2)))
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), shapes)


@pytest.mark.parametrize("specific_stages", [0, 2])
def test_load_backbone_fills_every_stem_and_the_shared_stages(specific_stages: int):
  variables = _reid_variables(specific_stages)
  resnet = convert.torchvision_resnet_variables(torch_reference.random_state_dict(18, width=8),
                                                18, width=8)
  loaded = convert.load_backbone(variables, resnet)
  for collection in ("params", "batch_stats"):
    used = set()
    for part in ("stem_0", "stem_1", "stem_2", "shared"):
      for module, subtree in loaded[collection][part].items():
        stage = int(module[len("layer")]) if module.startswith("layer") else 0  # conv1, bn1: 0
        assert (stage <= specific_stages) == part.startswith("stem_"), (part, module)
        jax.tree.map(np.testing.assert_array_equal, subtree, resnet[collection][module])
        used.add(module)
    assert used == set(resnet[collection])  # every pretrained tensor went somewhere
  # The rest of the network keeps its own values; the input is not modified.
  for name in ("attention", "fusion", "classifier"):
    jax.tree.map(np.testing.assert_array_equal, loaded["params"][name], variables["params"][name])
  assert not np.any(variables["params"]["stem_0"]["conv1"]["kernel"])


def test_load_backbone_rejects_another_width():
  resnet = convert.torchvision_resnet_variables(torch_reference.random_state_dict(18, width=16),
                                                18, width=16)
  with pytest.raises(ValueError, match=r"config\.model\.width.*params/stem_0/conv1"):
    convert.load_backbone(_reid_variables(0, width=8), resnet)
