"""CTranslate2's model.bin, read and written with numpy, to make a Whisper model small enough to carry.

The bundled tiny.en `model.bin` is 75.5 MB, already float16 (every weight is type id 4), so re-saving
it in float16 saves nothing; with int8 weights it is about half. `quantize_int8(variables)` does
what CTranslate2's converter does for `--quantization int8_float16` (`ModelSpec._quantize` in
ctranslate2/specs/model_spec.py, 4.8.5): each linear, convolution and embedding `weight` becomes
int8 with one float32 scale per output row in `<name>_scale` (127 / the row's largest magnitude);
every other float variable stays float16. CTranslate2 turns int8 weights back into float16 or
float32 when a model is loaded with that compute type, so the GPU check can still run float16.

The file layout (CTranslate2's `ModelSpec._serialize`, binary version 6): uint32 version, string
spec name, uint32 revision, uint32 count, then per variable: string name, uint8 rank, rank x uint32
shape, uint8 type id, uint32 byte count, the bytes; then uint32 alias count and (alias, target)
string pairs. A string is uint16 length (with its NUL), the UTF-8 bytes, a NUL. Little-endian.

`read(path)` returns a Model; `write(model, path)` writes one back byte for byte (a round trip
of an unchanged model gives the same file). Raises ValueError for a file that is not such a model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy

# Type ids in CTranslate2's order (include/ctranslate2/types.h); bfloat16 has no numpy type and is refused.
TYPES = {0: numpy.float32, 1: numpy.int8, 2: numpy.int16, 3: numpy.int32, 4: numpy.float16}
TYPE_IDS = {numpy.dtype(value): key for key, value in TYPES.items()}
SUPPORTED_VERSIONS = (5, 6)
QUANTIZED_SUFFIX = "weight"    # linear, convolution and embedding weights have a `<name>_scale` in the spec


@dataclass
class Model:
    """A model.bin's contents: spec name and revision, variables in file order, aliases."""

    version: int
    spec: str
    revision: int
    variables: dict[str, numpy.ndarray] = field(default_factory=dict)
    aliases: list[tuple[str, str]] = field(default_factory=list)


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.position, self.path = data, 0, path

    def take(self, size: int) -> bytes:
        if self.position + size > len(self.data):
            raise ValueError(f"{self.path}: ends at byte {len(self.data)} inside a record; is it a CTranslate2 model.bin?")
        chunk = self.data[self.position:self.position + size]
        self.position += size
        return chunk

    def number(self, code: str) -> int:
        return struct.unpack("<" + code, self.take(struct.calcsize(code)))[0]

    def string(self) -> str:
        length = self.number("H")
        return self.take(length)[:-1].decode("utf-8")


def read(path: str | Path) -> Model:
    """The model.bin at `path`. Raises ValueError for another file, a version or type not handled here."""
    path = Path(path)
    reader = _Reader(path.read_bytes(), path)
    version = reader.number("I")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: binary version {version}, expected one of {SUPPORTED_VERSIONS} (CTranslate2 4.x)")
    model = Model(version, reader.string(), reader.number("I"))
    for _ in range(reader.number("I")):
        name = reader.string()
        shape = tuple(reader.number("I") for _ in range(reader.number("B")))
        type_id = reader.number("B")
        if type_id not in TYPES:
            raise ValueError(f"{path}: variable {name!r} has type id {type_id}, which this reader does not handle")
        raw = reader.take(reader.number("I"))
        model.variables[name] = numpy.frombuffer(raw, dtype=TYPES[type_id]).reshape(shape)
    model.aliases = [(reader.string(), reader.string()) for _ in range(reader.number("I"))]
    if reader.position != len(reader.data):
        raise ValueError(f"{path}: {len(reader.data) - reader.position} bytes after the aliases")
    return model


def write(model: Model, path: str | Path) -> None:
    """Write `model` to `path` in the layout `read` reads. Raises ValueError for an unsupported dtype."""

    def string(text: str) -> bytes:
        encoded = text.encode("utf-8")
        return struct.pack("<H", len(encoded) + 1) + encoded + b"\0"

    parts = [struct.pack("<I", model.version), string(model.spec), struct.pack("<II", model.revision, len(model.variables))]
    for name, value in model.variables.items():
        if value.dtype not in TYPE_IDS:
            raise ValueError(f"variable {name!r} has dtype {value.dtype}, not one of CTranslate2's")
        data = numpy.ascontiguousarray(value).tobytes()
        parts += [string(name), struct.pack("<B", value.ndim), struct.pack(f"<{value.ndim}I", *value.shape),
                  struct.pack("<BI", TYPE_IDS[value.dtype], len(data)), data]
    parts.append(struct.pack("<I", len(model.aliases)))
    parts += [string(alias) + string(target) for alias, target in model.aliases]
    Path(path).write_bytes(b"".join(parts))


def quantize_int8(model: Model) -> Model:
    """A copy of `model` with int8 weights (per-row float32 scales) and the other float variables in float16,
    as CTranslate2's converter writes `int8_float16`. Raises ValueError when the model has int8 weights already."""
    variables: dict[str, numpy.ndarray] = {}
    for name, value in model.variables.items():
        if name.split("/")[-1] == QUANTIZED_SUFFIX and value.ndim >= 2:
            if value.dtype == numpy.int8:
                raise ValueError(f"variable {name!r} is int8 already")
            rows = value.astype(numpy.float32).reshape(value.shape[0], -1)
            largest = numpy.abs(rows).max(axis=1)
            largest[largest == 0] = 127.0
            largest = numpy.maximum(largest, numpy.float32(127) / numpy.finfo(numpy.float32).max)
            scale = (numpy.float32(127.0) / largest).astype(numpy.float32)
            variables[name] = numpy.rint(rows * scale[:, None]).astype(numpy.int8).reshape(value.shape)
            variables[name + "_scale"] = scale
        elif value.dtype in (numpy.float32, numpy.float16):
            variables[name] = value.astype(numpy.float16)
        else:
            variables[name] = value
    return Model(model.version, model.spec, model.revision, variables, list(model.aliases))
