"""GGUF files read over ``mmap``: header, metadata key/values, tensor infos and raw tensor bytes.

A GGUF file is laid out as::

    magic b"GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x (key string, value type u32, value)
    tensor_count x (name string, n_dims u32, n_dims x dim u64, ggml type u32, offset u64)
    padding up to `general.alignment` (32 by default)
    tensor data (each tensor at data start + its offset)

Strings are a u64 byte length followed by UTF-8 bytes; arrays are an item type u32, a u64 count,
then the items. Nothing here trusts a length or count read from the file: each is checked against
the bytes left before anything is read or allocated, so a corrupt file raises ``GGUFError``.

``gguf.GGUFReader`` builds a numpy view for every string of the vocabulary, which is slow for a
49k-token vocabulary (``benchmarks/NOTES.md``, "Figures behind the code"); this module reads
them with ``struct`` and never touches the tensor data until it is asked for.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: the struct format of each scalar type, then string and array.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_NESTING = 8  # arrays of arrays are legal; a corrupt file could nest them until the stack ends
_HEADER_BYTES = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, a one-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, ggml type, offset


class GGUFError(ValueError):
    """The file is not a GGUF file this module can read: truncated, corrupt or of an unknown kind."""


class NotGGUFError(GGUFError):
    """The file does not start with the GGUF magic bytes."""


class GGUFVersionError(GGUFError):
    """The file's GGUF version is not one of ``SUPPORTED_VERSIONS``."""

    def __init__(self, version: int) -> None:
        """Remember the version the file declares."""
        super().__init__(f"GGUF version {version} is not supported; only versions 2 and 3 are")
        self.version = version


@dataclass(frozen=True)
class GGUFHeader:
    """The fixed-size start of a GGUF file."""

    version: int
    byte_order: str  # "<" little-endian or ">" big-endian, as ``struct`` spells them
    tensor_count: int
    kv_count: int


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's data lies in the file and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # as ggml lists it: fastest-varying dimension first ([in, out] for a matrix)
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        """Number of values the tensor holds."""
        return prod(self.shape)


@dataclass(eq=False)
class GGUFFile:
    """A GGUF file mapped into memory, with its metadata and tensor infos parsed."""

    path: Path
    buf: mmap.mmap
    header: GGUFHeader
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]  # in file order
    alignment: int
    data_offset: int  # absolute byte offset where the tensor data section starts

    def close(self) -> None:
        """Unmap the file; if tensor views are still alive, the map stays until they are gone."""
        try:
            self.buf.close()
        except BufferError:  # numpy arrays from tensor_bytes still point into the map
            pass

    def __enter__(self) -> GGUFFile:
        """Use as a context manager that closes the map on exit."""
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the map."""
        self.close()


class _Cursor:
    """Reads GGUF values one after another from a buffer, checking every length against its end."""

    def __init__(self, buf: mmap.mmap, byte_order: str, offset: int = 0, errors: str = "strict") -> None:
        self.buf, self.byte_order, self.offset, self.errors = buf, byte_order, offset, errors
        self._structs: dict[str, struct.Struct] = {}

    @property
    def left(self) -> int:
        """Bytes between the cursor and the end of the file."""
        return len(self.buf) - self.offset

    def need(self, n_bytes: int, what: str) -> None:
        """Raise ``GGUFError`` unless ``n_bytes`` more bytes are left for ``what``."""
        if n_bytes > self.left:
            raise GGUFError(f"the file ends inside {what} at byte {self.offset}: it needs {n_bytes} bytes, "
                            f"but only {self.left} of its {len(self.buf)} bytes are left")

    def unpack(self, fmt: str, count: int = 1, what: str = "a number") -> tuple[Any, ...]:
        """``count`` values of the ``struct`` format character ``fmt``."""
        code = f"{self.byte_order}{count}{fmt}"
        packer = self._structs.get(code)
        if packer is None:
            self.need(struct.calcsize(f"{self.byte_order}{fmt}") * count, what)  # before struct sees count
            packer = self._structs[code] = struct.Struct(code)
        self.need(packer.size, what)
        values = packer.unpack_from(self.buf, self.offset)
        self.offset += packer.size
        return values

    def u32(self, what: str) -> int:
        """One unsigned 32-bit integer."""
        return self.unpack("I", what=what)[0]

    def u64(self, what: str) -> int:
        """One unsigned 64-bit integer."""
        return self.unpack("Q", what=what)[0]

    def string(self, what: str = "a string", errors: str = "strict") -> str:
        """A length-prefixed UTF-8 string."""
        length = self.u64(f"the length of {what}")
        self.need(length, what)
        start, self.offset = self.offset, self.offset + length
        try:
            return str(self.buf[start : self.offset], "utf-8", errors)
        except UnicodeDecodeError as exc:
            raise GGUFError(f"{what} at byte {start} is not valid UTF-8 ({exc.reason})") from exc

    def strings(self, count: int, what: str) -> list[str]:
        """``count`` strings in a row (the vocabulary: a tight loop, as there are tens of thousands)."""
        length_of = self._structs.setdefault(f"{self.byte_order}Q", struct.Struct(f"{self.byte_order}Q"))
        buf, end, offset, errors, out = self.buf, len(self.buf), self.offset, self.errors, []
        try:
            for index in range(count):
                if offset + 8 > end:
                    self.offset = offset
                    self.need(8, f"the length of string {index} of {what}")
                (length,) = length_of.unpack_from(buf, offset)
                offset += 8
                if length > end - offset:
                    self.offset = offset
                    self.need(length, f"string {index} of {what}")
                out.append(str(buf[offset : offset + length], "utf-8", errors))
                offset += length
        except UnicodeDecodeError as exc:
            raise GGUFError(f"string {len(out)} of {what} at byte {offset} is not valid UTF-8 ({exc.reason})") from exc
        self.offset = offset
        return out

    def value(self, value_type: int, what: str, depth: int = 0) -> Any:
        """One metadata value of GGUF type ``value_type`` as a plain Python value (arrays as lists)."""
        if value_type == _STRING:
            return self.string(what, self.errors)
        if value_type == _ARRAY:
            return self.array(what, depth)
        if value_type not in _SCALAR_FORMATS:
            raise GGUFError(f"{what} has unknown GGUF value type {value_type} (known: 0-12)")
        return self.unpack(_SCALAR_FORMATS[value_type], what=what)[0]

    def array(self, what: str, depth: int) -> list[Any]:
        """An array value: item type, count, items."""
        if depth >= _MAX_ARRAY_NESTING:
            raise GGUFError(f"{what} nests arrays more than {_MAX_ARRAY_NESTING} deep")
        item_type = self.u32(f"the item type of {what}")
        count = self.u64(f"the item count of {what}")
        if item_type in _SCALAR_FORMATS:
            return list(self.unpack(_SCALAR_FORMATS[item_type], count, what))
        min_item = {_STRING: 8, _ARRAY: 12}.get(item_type)
        if min_item is None:
            raise GGUFError(f"{what} is an array of unknown GGUF value type {item_type} (known: 0-12)")
        self.need(count * min_item, f"{what} ({count} items)")  # a garbage count fails here, not in a loop
        if item_type == _STRING:
            return self.strings(count, what)
        return [self.array(f"item {i} of {what}", depth + 1) for i in range(count)]


def _map(path: Path) -> mmap.mmap:
    """Map ``path`` read-only after checking its magic bytes."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head[:4] != MAGIC:
            raise NotGGUFError(f"it starts with {head!r}, not {MAGIC!r}")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the file object


def _read_header(buf: mmap.mmap) -> GGUFHeader:
    """Magic, version, tensor count and kv count; the version also tells the byte order."""
    # A big-endian file's version (2 or 3) read little-endian is huge.
    byte_order = "<" if len(buf) >= 8 and struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"
    cursor = _Cursor(buf, byte_order, offset=4)
    version = cursor.u32("the GGUF version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFVersionError(version)
    tensor_count, kv_count = cursor.unpack("Q", 2, "the tensor and key/value counts")
    return GGUFHeader(version, byte_order, tensor_count, kv_count)


def _read_metadata(cursor: _Cursor, kv_count: int) -> dict[str, Any]:
    """The ``kv_count`` key/value pairs at the cursor."""
    cursor.need(kv_count * _MIN_KV_BYTES, f"the metadata ({kv_count} key/value pairs)")
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = cursor.string(f"metadata key {index}")
        if key in metadata:
            raise GGUFError(f"metadata key '{key}' appears twice")
        metadata[key] = cursor.value(cursor.u32(f"the value type of '{key}'"), f"metadata value '{key}'")
    return metadata


def read_metadata(path: str | Path, errors: str = "strict") -> dict[str, Any]:
    """All key/value metadata of a GGUF file as plain Python values; the tensor table is not read.

    ``errors`` is how string values that are not valid UTF-8 decode (``bytes.decode``'s argument).
    """
    with _map(Path(path)) as buf:
        header = _read_header(buf)
        return _read_metadata(_Cursor(buf, header.byte_order, _HEADER_BYTES, errors), header.kv_count)


@dataclass(frozen=True)
class _RawTensorInfo:
    """A tensor-info entry as stored: type id not yet checked, offset relative to the data section."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    relative_offset: int


def _read_tensor_infos(cursor: _Cursor, tensor_count: int) -> list[_RawTensorInfo]:
    """The ``tensor_count`` tensor-info entries at the cursor."""
    cursor.need(tensor_count * _MIN_TENSOR_INFO_BYTES, f"the tensor-info table ({tensor_count} tensors)")
    infos = []
    for index in range(tensor_count):
        what = f"tensor info {index} of {tensor_count}"
        name = cursor.string(f"the name in {what}")
        n_dims = cursor.u32(f"n_dims of tensor '{name}'")
        shape = cursor.unpack("Q", n_dims, f"the {n_dims} dimensions of tensor '{name}'")
        type_id = cursor.u32(f"the ggml type of tensor '{name}'")
        infos.append(_RawTensorInfo(name, shape, type_id, cursor.u64(f"the data offset of tensor '{name}'")))
    return infos


def _alignment(metadata: dict[str, Any]) -> int:
    """``general.alignment``: where the data section and each tensor start (a power of two)."""
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"general.alignment is {alignment!r}, not a positive power of two")
    return alignment


def _locate(raw: _RawTensorInfo, data_offset: int, file_size: int) -> TensorInfo:
    """Check one tensor's type and extent against the file and return its ``TensorInfo``."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # numpy-heavy; only needed for tensors

    try:
        ggml_type = GGMLQuantizationType(raw.type_id)
        block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError) as exc:
        raise GGUFError(f"tensor '{raw.name}' has ggml type id {raw.type_id}, which the installed gguf "
                        f"package does not know; a file newer than the package may need `pip install -U gguf`") from exc
    if raw.shape and raw.shape[0] % block_size:
        raise GGUFError(f"tensor '{raw.name}' has rows of {raw.shape[0]} values, not a multiple of the "
                        f"{ggml_type.name} block size {block_size}")
    n_bytes = prod(raw.shape) * type_size // block_size
    start = data_offset + raw.relative_offset
    if start + n_bytes > file_size:
        raise GGUFError(f"the data of tensor '{raw.name}' ({n_bytes} bytes of {ggml_type.name}) runs from byte "
                        f"{start} to {start + n_bytes}, past the end of the file at byte {file_size}")
    return TensorInfo(raw.name, tuple(raw.shape), ggml_type, start, n_bytes)


def open_gguf(path: str | Path, errors: str = "strict") -> GGUFFile:
    """Map a GGUF file and parse its header, metadata and tensor infos (no tensor data is read).

    Raises ``GGUFError`` (``NotGGUFError``, ``GGUFVersionError``) if the file is not a well-formed
    GGUF file, including when a tensor's data would run past the end of the file. ``errors`` is
    how metadata string values that are not valid UTF-8 decode.
    """
    path = Path(path)
    buf = _map(path)
    try:
        header = _read_header(buf)
        cursor = _Cursor(buf, header.byte_order, _HEADER_BYTES, errors)
        metadata = _read_metadata(cursor, header.kv_count)
        raw_infos = _read_tensor_infos(cursor, header.tensor_count)
        alignment = _alignment(metadata)
        data_offset = -(-cursor.offset // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for raw in raw_infos:
            if raw.name in tensors:
                raise GGUFError(f"tensor '{raw.name}' appears twice in the tensor-info table")
            tensors[raw.name] = _locate(raw, data_offset, len(buf))
    except BaseException:
        buf.close()
        raise
    return GGUFFile(path, buf, header, metadata, tensors, alignment, data_offset)


def tensor_bytes(gguf_file: GGUFFile, info: TensorInfo) -> np.ndarray:
    """The raw bytes of a tensor as a read-only 1-D ``uint8`` numpy view of the file map (no copy)."""
    return np.frombuffer(gguf_file.buf, dtype=np.uint8, count=info.n_bytes, offset=info.offset)
