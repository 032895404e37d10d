"""The Open Inference Protocol (KServe v2, as NVIDIA Triton Inference Server, KServe and MLServer speak it) over HTTP:
request parsing, validation against the fleet's inputs, and responses, with the binary tensor data extension.

Every problem with a request is a :class:`ProtocolError` carrying its HTTP status and a message that says what was
expected and what came; the app turns it into ``{"error": message}``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .fleet import TensorSpec

__all__ = ["ProtocolError", "InferRequest", "parse_infer_request", "encode_infer_response", "DATATYPES",
           "datatype_of", "HEADER_LENGTH"]

HEADER_LENGTH = "Inference-Header-Content-Length"

# v2 datatype -> (torch dtype, numpy dtype of the wire format)
DATATYPES: Dict[str, Tuple[torch.dtype, Any]] = {
    "BOOL": (torch.bool, np.bool_), "UINT8": (torch.uint8, np.uint8), "INT8": (torch.int8, np.int8),
    "INT16": (torch.int16, np.int16), "INT32": (torch.int32, np.int32), "INT64": (torch.int64, np.int64),
    "FP16": (torch.float16, np.float16), "FP32": (torch.float32, np.float32), "FP64": (torch.float64, np.float64),
    "BF16": (torch.bfloat16, None),
}
_BY_TORCH = {t: name for name, (t, _) in DATATYPES.items()}


def datatype_of(dtype: torch.dtype) -> str:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"no Open Inference Protocol datatype for {dtype}") from None


class ProtocolError(Exception):
    """A request the server cannot serve: ``status`` (400, 404, 413, ...) and what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class InferRequest:
    id: Optional[str]
    inputs: Dict[str, Tensor]
    rows: int
    outputs: Optional[List[str]] = None          # None: every output
    binary: Dict[str, bool] = field(default_factory=dict)  # output name -> binary
    binary_default: bool = False


def _parse_header(body: bytes, header_length: Optional[str]) -> Tuple[Dict[str, Any], bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(400, f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise ProtocolError(400, f"{HEADER_LENGTH} is {n} but the body has {len(body)} bytes")
        head, rest = body[:n], body[n:]
    else:
        head, rest = body, b""
    try:
        doc = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(400, f"the request must be a JSON object with \"inputs\", got {type(doc).__name__}")
    return doc, rest


def _tensor_from(entry: Dict[str, Any], blob: Optional[bytes]) -> Tuple[str, Tensor]:
    name = entry.get("name")
    if not isinstance(name, str):
        raise ProtocolError(400, f"each input needs a \"name\" string, got {entry.get('name')!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                             for d in shape):
        raise ProtocolError(400, f"input {name!r}: \"shape\" must be a list of non-negative integers, got {shape!r}")
    dt = entry.get("datatype")
    if dt not in DATATYPES:
        raise ProtocolError(400, f"input {name!r}: unknown datatype {dt!r}; one of {', '.join(DATATYPES)}")
    tdtype, npdtype = DATATYPES[dt]
    count = math.prod(shape)
    if blob is not None:
        width = torch.empty((), dtype=tdtype).element_size()
        if len(blob) != count * width:
            raise ProtocolError(400, f"input {name!r}: shape {shape} of {dt} is {count * width} bytes, the binary "
                                     f"data has {len(blob)}")
        if count == 0:
            return name, torch.empty(shape, dtype=tdtype)
        return name, torch.frombuffer(bytearray(blob), dtype=tdtype).reshape(shape)
    if "data" not in entry:
        raise ProtocolError(400, f"input {name!r} has no \"data\" (nor binary_data_size)")
    if npdtype is None:
        raise ProtocolError(400, f"input {name!r}: {dt} only travels as binary data (the binary tensor extension)")
    try:
        arr = np.asarray(entry["data"], dtype=npdtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise ProtocolError(400, f"input {name!r}: \"data\" is not a list of {dt} values: {e}") from None
    if arr.size != count:
        raise ProtocolError(400, f"input {name!r}: shape {shape} holds {count} elements, \"data\" has {arr.size}")
    return name, torch.from_numpy(np.ascontiguousarray(arr.reshape(shape)))


def parse_infer_request(body: bytes, header_length: Optional[str], specs: Sequence[TensorSpec],
                        outputs: Sequence[str], max_rows: int) -> InferRequest:
    """Parse and check an infer request against the model's inputs. Raises ProtocolError (400)."""
    doc, rest = _parse_header(body, header_length)
    entries = doc.get("inputs")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ProtocolError(400, "\"inputs\" must be a non-empty list of tensors ({\"name\", \"shape\", "
                                 "\"datatype\", \"data\"})")
    tensors: Dict[str, Tensor] = {}
    offset = 0
    for e in entries:
        params = e.get("parameters") or {}
        blob = None
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or size < 0 or offset + size > len(rest):
                raise ProtocolError(400, f"input {e.get('name')!r}: binary_data_size {size!r} runs past the "
                                         f"{len(rest)} bytes of binary data")
            blob = rest[offset:offset + size]
            offset += size
        name, t = _tensor_from(e, blob)
        if name in tensors:
            raise ProtocolError(400, f"input {name!r} is given twice")
        tensors[name] = t
    by_name = {s.name: s for s in specs}
    unknown = [n for n in tensors if n not in by_name]
    if unknown:
        raise ProtocolError(400, f"unknown input {unknown[0]!r}; the model takes {', '.join(by_name)}")
    missing = [s.name for s in specs if not s.optional and s.name not in tensors]
    if missing:
        raise ProtocolError(400, f"missing input {missing[0]!r}; the model takes "
                                 f"{', '.join(s.name + ('' if not s.optional else ' (optional)') for s in specs)}")
    rows = None
    var_len: Optional[int] = None
    for s in specs:
        if s.name not in tensors:
            continue
        t = tensors[s.name]
        want = [-1] + list(s.shape)
        if t.dtype != s.dtype:
            raise ProtocolError(400, f"input {s.name!r}: expected datatype {datatype_of(s.dtype)}, got "
                                     f"{datatype_of(t.dtype)}")
        if t.dim() != len(want) or any(w != -1 and w != g for w, g in zip(want, t.shape)):
            raise ProtocolError(400, f"input {s.name!r}: expected shape {want} (-1: any size), got {list(t.shape)}")
        if rows is None:
            rows = t.shape[0]
        elif t.shape[0] != rows:
            raise ProtocolError(400, f"input {s.name!r} has {t.shape[0]} rows, the other inputs {rows}")
        for w, g in zip(s.shape, t.shape[1:]):
            if w == -1:
                if var_len is None:
                    var_len = g
                elif g != var_len:
                    raise ProtocolError(400, f"input {s.name!r} has length {g}, the other inputs {var_len}")
                if g == 0:
                    raise ProtocolError(400, f"input {s.name!r} is empty along its variable dim")
                if s.max_length is not None and g > s.max_length:
                    raise ProtocolError(400, f"input {s.name!r} has length {g}; the model takes at most "
                                             f"{s.max_length}")
        if s.max_value is not None and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= s.max_value:
                raise ProtocolError(400, f"input {s.name!r}: values must lie in [0, {s.max_value}), got "
                                         f"{lo if lo < 0 else hi}")
    assert rows is not None
    if rows == 0:
        raise ProtocolError(400, "the request has 0 rows; send at least one")
    if rows > max_rows:
        raise ProtocolError(400, f"the request has {rows} rows; this server takes at most {max_rows} per request "
                                 "(--max-batch): split it")
    req_params = doc.get("parameters") or {}
    binary_default = bool(req_params.get("binary_data_output", False))
    wanted: Optional[List[str]] = None
    binary: Dict[str, bool] = {}
    if doc.get("outputs") is not None:
        outs = doc["outputs"]
        if not isinstance(outs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                 for o in outs):
            raise ProtocolError(400, "\"outputs\" must be a list of {\"name\": ...}")
        wanted = []
        for o in outs:
            if o["name"] not in outputs:
                raise ProtocolError(400, f"unknown output {o['name']!r}; the model returns {', '.join(outputs)}")
            wanted.append(o["name"])
            binary[o["name"]] = bool((o.get("parameters") or {}).get("binary_data", binary_default))
    rid = doc.get("id")
    return InferRequest(str(rid) if rid is not None else None, tensors, rows, wanted, binary, binary_default)


def encode_infer_response(model: str, version: str, req: InferRequest, outputs: Dict[str, Tensor]
                          ) -> Tuple[bytes, Dict[str, str]]:
    """The response body and its headers (binary outputs after the JSON header when asked for)."""
    names = req.outputs if req.outputs is not None else list(outputs)
    entries, blobs = [], []
    for name in names:
        t = outputs[name].detach().cpu().contiguous()
        entry: Dict[str, Any] = {"name": name, "datatype": datatype_of(t.dtype), "shape": list(t.shape)}
        if req.binary.get(name, req.binary_default):
            raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif t.dtype == torch.bfloat16:
            entry["datatype"] = "FP32"
            entry["data"] = t.float().flatten().tolist()
        else:
            entry["data"] = t.flatten().tolist()
        entries.append(entry)
    doc: Dict[str, Any] = {"model_name": model, "model_version": version, "outputs": entries}
    if req.id is not None:
        doc["id"] = req.id
    head = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(head))}
