r"""torchvision ResNet weights -> Flax variables of `mmreid_jax.models.resnet.ResNet`.

  python -m mmreid_jax.convert --input resnet50.pth --output resnet50.safetensors

reads a torchvision checkpoint (`.pth`, needs the `torch` extra), checks that it holds a complete
ResNet-18/34/50/101 backbone, and writes its backbone tensors, under their torchvision names, as
float32 `.safetensors` (which `config.model.pretrained` and `torchvision_resnet_variables` read
without torch).

Names and layouts (torchvision -> Flax):
  conv1.weight (O, I, kh, kw)             -> params  conv1/kernel (kh, kw, I, O)
  bn1.{weight, bias}                      -> params  bn1/{scale, bias}
  bn1.{running_mean, running_var}         -> batch_stats bn1/{mean, var}
  layer{s}.{b}.conv{i}, .bn{i}            -> layer{s}_{b}/conv{i}, bn{i}
  layer{s}.{b}.downsample.0, .1           -> layer{s}_{b}/downsample_conv, downsample_bn
`fc.*` (the ImageNet classifier) and `*.num_batches_tracked` are known and ignored; any other
name is an error, and so is a missing or mis-shaped tensor.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmreid_jax.models.resnet import BOTTLENECK_DEPTHS, STAGE_SIZES, ResNet

Source = str | os.PathLike | Mapping[str, Any]
Variables = dict[str, dict[str, Any]]

# Tensors of a torchvision checkpoint that the backbone does not use.
IGNORED_TENSORS = re.compile(r"^fc\.(weight|bias)$|\.num_batches_tracked$")
_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}
_BLOCK_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
# Backbone submodules that torchvision's ResNet has no weights for (AGW's non-local blocks).
NOT_IN_TORCHVISION = re.compile(r"^non_local\d+_\d+$")
_MAX_LISTED = 12


def load_state_dict(source: Source) -> dict[str, np.ndarray]:
  """Reads a torchvision-style state dict as {name: float32 NumPy array}.

  Args:
    source: a `.pth` / `.pt` file (read with `torch.load(weights_only=True)`; needs torch), a
      `.safetensors` file (read with `safetensors.numpy`; no torch), or a mapping of names to
      arrays (NumPy arrays, torch tensors, anything `np.asarray` takes).

  Raises:
    FileNotFoundError, ValueError (unknown file type, not a mapping of tensors), ImportError
    (a `.pth` file without torch installed).
  """
  if isinstance(source, Mapping):
    tensors = source
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"No weights file {path!r}.")
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".safetensors":
      from safetensors.numpy import load_file

      tensors = load_file(path)
    elif suffix in (".pth", ".pt"):
      try:
        import torch
      except ImportError as error:
        raise ImportError(
            f"Reading {path!r} needs PyTorch: `pip install 'mmreid-jax[torch]'`, or convert it "
            "once where torch is installed (`python -m mmreid_jax.convert --input FILE.pth "
            "--output FILE.safetensors`) and use the .safetensors file.") from error
      tensors = torch.load(path, map_location="cpu", weights_only=True)
      if not isinstance(tensors, Mapping):
        raise ValueError(f"{path!r} holds a {type(tensors).__name__}, not a state dict "
                         "(a mapping of tensor names to tensors).")
    else:
      raise ValueError(f"Weights file {path!r}: unknown type {suffix!r}; expected .pth, .pt "
                       "or .safetensors.")
  return {str(name): _to_numpy(name, value) for name, value in tensors.items()}


def _to_numpy(name: str, value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor: bfloat16 and half have no NumPy view
    value = value.detach().cpu().float().numpy()
  array = np.asarray(value)
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f"Tensor {name!r} has dtype {array.dtype}; expected numbers.")
  return array if IGNORED_TENSORS.search(name) else array.astype(np.float32)


def torchvision_name(collection: str, path: tuple[str, ...]) -> str:
  """The torchvision name of the ResNet variable at `path` of `collection`.

  ("params", ("layer1_0", "downsample_conv", "kernel")) -> "layer1.0.downsample.0.weight"
  """
  *modules, leaf = path
  parts = []
  for module in modules:
    block = re.fullmatch(r"layer(\d)_(\d+)", module)
    parts.append(f"layer{block[1]}.{block[2]}" if block else _BLOCK_MODULES.get(module, module))
  return ".".join(parts + [_LEAF_NAMES[(collection, leaf)]])


@functools.cache
def _expected_shapes(depth: int, width: int) -> dict[str, tuple[str, tuple[str, ...],
                                                                 tuple[int, ...]]]:
  """{torchvision name: (collection, Flax path, torchvision shape)} of ResNet(depth, width)."""
  model = ResNet(depth=depth, width=width, last_stride=2)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  expected = {}
  for collection, tree in shapes.items():
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      path = tuple(k.key for k in key_path)
      shape = tuple(leaf.shape)
      if len(shape) == 4:  # Flax (kh, kw, I, O) -> torch (O, I, kh, kw)
        shape = (shape[3], shape[2], shape[0], shape[1])
      expected[torchvision_name(collection, path)] = (collection, path, shape)
  return {name: expected[name] for name in sorted(expected, key=_torchvision_order)}


_RANKS = {"conv1": 0, "bn1": 1, "conv2": 2, "bn2": 3, "conv3": 4, "bn3": 5, "downsample": 6,
          "weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}


def _torchvision_order(name: str) -> list[tuple[int, int]]:
  """Sort key giving torchvision's state-dict order (conv1, bn1, layer1.0.conv1, ...)."""
  key = []
  for part in name.split("."):
    if part.isdigit():
      key.append((0, int(part)))
    elif part.startswith("layer"):
      key.append((1, 10 + int(part[len("layer"):])))
    else:
      key.append((1, _RANKS[part]))
  return key


def _listing(names: list[str]) -> str:
  shown = ", ".join(names[:_MAX_LISTED])
  return shown + (f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def torchvision_resnet_variables(source: Source, depth: int, width: int = 64) -> Variables:
  """Flax variables of `ResNet(depth=depth, width=width, last_stride=2)` from torchvision weights.

  The returned variables give the torchvision network's feature map: for NHWC images x,
  `ResNet(depth, width, last_stride=2).apply(variables, x)` is (B, h, w, C), torchvision's
  `layer4` output transposed from NCHW.

  Args:
    source: a `.pth`, `.pt` or `.safetensors` file or an in-memory mapping (`load_state_dict`).
    depth: 18, 34, 50 or 101.
    width: channels of the stem (64 in torchvision's networks).

  Returns:
    {"params": ..., "batch_stats": ...} of float32 NumPy arrays.

  Raises:
    ValueError: an unsupported depth, or unknown, missing or mis-shaped tensors (all named).
    FileNotFoundError, ImportError: see `load_state_dict`.
  """
  if depth not in STAGE_SIZES:
    raise ValueError(f"ResNet depth={depth} is not supported; expected one of "
                     f"{sorted(STAGE_SIZES)}.")
  described = "the given state dict" if isinstance(source, Mapping) else repr(os.fspath(source))
  tensors = load_state_dict(source)
  expected = _expected_shapes(depth, width)
  unknown = [n for n in tensors if n not in expected and not IGNORED_TENSORS.search(n)]
  missing = [n for n in expected if n not in tensors]
  misshaped = [f"{n} {tuple(tensors[n].shape)} (expected {shape})"
               for n, (_, _, shape) in expected.items()
               if n in tensors and tuple(tensors[n].shape) != shape]
  if unknown or missing or misshaped:
    problems = [f"{label}: {_listing(names)}" for label, names in
                (("unknown tensors", unknown), ("missing tensors", missing),
                 ("mis-shaped tensors", misshaped)) if names]
    raise ValueError(f"{described} is not a torchvision ResNet-{depth} of width {width}; "
                     + "; ".join(problems) + ".")
  variables: Variables = {"params": {}, "batch_stats": {}}
  for name, (collection, path, _) in expected.items():
    value = tensors[name]
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    node = variables[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(value, np.float32)
  return variables


def infer_architecture(tensors: Mapping[str, Any]) -> tuple[int, int]:
  """(depth, width) of the torchvision ResNet whose state dict `tensors` is.

  Raises:
    ValueError: the names do not describe a ResNet-18/34/50/101.
  """
  if "conv1.weight" not in tensors:
    raise ValueError("No tensor 'conv1.weight': not a torchvision ResNet state dict.")
  width = int(np.shape(tensors["conv1.weight"])[0])
  blocks = []
  for stage in range(1, 5):
    indices = {int(m[1]) for n in tensors if (m := re.match(rf"layer{stage}\.(\d+)\.", n))}
    blocks.append(max(indices) + 1 if indices else 0)
  bottleneck = "layer1.0.conv3.weight" in tensors
  for depth, sizes in STAGE_SIZES.items():
    if tuple(blocks) == sizes and bottleneck == (depth in BOTTLENECK_DEPTHS):
      return depth, width
  raise ValueError(f"Blocks per stage {tuple(blocks)} ({'bottleneck' if bottleneck else 'basic'}"
                   f" blocks) match no supported ResNet; expected one of "
                   f"{ {d: s for d, s in STAGE_SIZES.items()} }.")


def load_backbone(variables: Variables, resnet: Variables) -> Variables:
  """Puts a whole ResNet's variables into every stem and the shared stages of a ReID network.

  `MultimodalReID` holds `stem_{m}` (stages 0..specific_stages, one per modality) and `shared`
  (the later stages), with the whole network's submodule names; each gets the submodules of
  `resnet` it holds. Everything else (attention, fusion, heads, and the non-local blocks
  `non_local*` inside the backbone, which torchvision's ResNet lacks) is left as it is.

  Args:
    variables: {"params", "batch_stats"} of a `MultimodalReID`.
    resnet: {"params", "batch_stats"} of the whole ResNet (`torchvision_resnet_variables`).

  Returns:
    New variables (the input is not modified).

  Raises:
    ValueError: a backbone submodule missing from `resnet` or of another shape (a network of
      another depth or width), or a network without stems.
  """
  stems = [k for k in variables["params"] if re.fullmatch(r"stem_\d+", k)]
  if not stems or "shared" not in variables["params"]:
    raise ValueError(f"Expected a ReID network with `stem_<m>` and `shared` parameters; got "
                     f"{sorted(variables['params'])}.")
  result = {collection: dict(tree) for collection, tree in variables.items()}
  problems = []
  for collection in ("params", "batch_stats"):
    for part in stems + ["shared"]:
      mine = variables[collection].get(part, {})
      loaded = {}
      for module, subtree in mine.items():
        if NOT_IN_TORCHVISION.match(module):
          loaded[module] = subtree
          continue
        source = resnet[collection].get(module)
        got = jax.tree.map(np.shape, source) if source is not None else None
        want = jax.tree.map(np.shape, subtree)
        if got != want:
          problems.append(f"{collection}/{part}/{module}: the network has {want}, the "
                          f"pretrained weights {got if got is not None else 'nothing'}")
          continue
        loaded[module] = jax.tree.map(lambda a: np.asarray(a, np.float32), source)
      result[collection][part] = loaded
  if problems:
    raise ValueError("The pretrained ResNet does not fit the network's backbone (check "
                     "config.model.depth and config.model.width): "
                     + "; ".join(problems[:_MAX_LISTED])
                     + (f" ... and {len(problems) - _MAX_LISTED} more" if
                        len(problems) > _MAX_LISTED else "") + ".")
  return result


def convert_file(input_path: str, output_path: str, depth: int | None = None) -> tuple[int, int]:
  """Checks a torchvision ResNet checkpoint and writes its backbone tensors as .safetensors.

  Args:
    input_path: `.pth`, `.pt` or `.safetensors`.
    output_path: the `.safetensors` file to write (float32, torchvision names, without `fc.*`
      and `num_batches_tracked`).
    depth: the expected depth; None infers it from the tensor names.

  Returns:
    The (depth, width) written.
  """
  if not output_path.endswith(".safetensors"):
    raise ValueError(f"--output={output_path!r}: expected a path ending in .safetensors.")
  tensors = load_state_dict(input_path)
  if depth is None:
    depth, width = infer_architecture(tensors)
  else:
    width = int(np.shape(tensors["conv1.weight"])[0]) if "conv1.weight" in tensors else 64
  torchvision_resnet_variables(tensors, depth, width)  # names every bad tensor
  backbone = {name: tensors[name] for name in _expected_shapes(depth, width)}
  from safetensors.numpy import save_file

  directory = os.path.dirname(os.path.abspath(output_path))
  os.makedirs(directory, exist_ok=True)
  save_file({k: np.ascontiguousarray(v, np.float32) for k, v in backbone.items()},
            output_path + ".tmp", metadata={"architecture": f"resnet{depth}",
                                            "width": str(width)})
  os.replace(output_path + ".tmp", output_path)
  return depth, width


def main(argv: list[str] | None = None) -> None:
  """Command line: `python -m mmreid_jax.convert --input FILE.pth --output FILE.safetensors`."""
  parser = argparse.ArgumentParser(
      prog="python -m mmreid_jax.convert",
      description="Check a torchvision ResNet checkpoint and write its backbone as .safetensors.")
  parser.add_argument("--input", required=True,
                      help="torchvision checkpoint (.pth, .pt or .safetensors)")
  parser.add_argument("--output", required=True, help="the .safetensors file to write")
  parser.add_argument("--depth", type=int, default=None,
                      help="expected depth (18, 34, 50 or 101); default: inferred from the names")
  args = parser.parse_args(argv)
  depth, width = convert_file(args.input, args.output, args.depth)
  print(f"Wrote the ResNet-{depth} (width {width}) backbone of {args.input} to {args.output}")


if __name__ == "__main__":
  main()
