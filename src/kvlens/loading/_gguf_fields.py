"""Open a GGUF file and turn its key-value fields into plain Python values."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gguf import GGUFReader
    from gguf.gguf_reader import ReaderField

# What GGUFReader raises on a file that is not GGUF or is cut short: bad magic, an unknown
# version, reads past the end (numpy view errors), undecodable strings.
_PARSE_ERRORS = (ValueError, IndexError, KeyError, TypeError, OverflowError, struct.error)


def open_gguf(path: str | Path) -> GGUFReader:
    """Memory-map ``path`` with ``gguf.GGUFReader``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
        ValueError: The file is not a valid GGUF file.
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, expected a .gguf file")
    try:
        return GGUFReader(path)
    except _PARSE_ERRORS as error:
        raise ValueError(f"{path} is not a valid GGUF file: {error}") from error


def field_value(field: ReaderField) -> Any:
    """The value of one field: a scalar, a string, or a list of them for arrays."""
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [value for i in field.data for value in field.parts[i].tolist()]
    if field.types[0] == GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8")
    return field.parts[-1].tolist()[0]


def read_fields(reader: GGUFReader, path: str | Path) -> dict[str, Any]:
    """All fields of ``reader`` as ``{key: value}``, arrays as lists.

    Raises:
        ValueError: A field cannot be decoded (a corrupted file).
    """
    try:
        return {name: field_value(field) for name, field in reader.fields.items()}
    except _PARSE_ERRORS as error:
        raise ValueError(f"{path} is not a valid GGUF file: {error}") from error


def scalar_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields that are single values (not arrays), for display."""
    return {key: value for key, value in fields.items() if not isinstance(value, list)}
