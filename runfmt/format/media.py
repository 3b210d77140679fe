"""Media types of artifacts by name (ART-1): one fixed table, the same on every machine."""

from __future__ import annotations

__all__ = ["MEDIA_TYPES", "OCTET_STREAM", "guess_media_type"]

OCTET_STREAM = "application/octet-stream"

MEDIA_TYPES: dict[str, str] = {
    "csv": "text/csv",
    "css": "text/css",
    "gif": "image/gif",
    "gz": "application/gzip",
    "htm": "text/html",
    "html": "text/html",
    "jpeg": "image/jpeg",
    "jpg": "image/jpeg",
    "js": "text/javascript",
    "json": "application/json",
    "log": "text/plain",
    "md": "text/markdown",
    "mp3": "audio/mpeg",
    "mp4": "video/mp4",
    "parquet": "application/vnd.apache.parquet",
    "pdf": "application/pdf",
    "png": "image/png",
    "svg": "image/svg+xml",
    "tsv": "text/tab-separated-values",
    "txt": "text/plain",
    "webp": "image/webp",
    "xml": "application/xml",
    "yaml": "application/yaml",
    "yml": "application/yaml",
    "zip": "application/zip",
    "zst": "application/zstd",
}
"""IANA media types by the extension after a name's last ``.``, in lower case (ART-1)."""


def guess_media_type(name: str) -> str:
    """The media type of an artifact named ``name`` by the table of ART-1, else a plain byte
    stream; independent of the machine's own tables, so every repair lists the same."""
    last = name.rsplit("/", 1)[-1]
    _, dot, extension = last.rpartition(".")
    return MEDIA_TYPES.get(extension.lower(), OCTET_STREAM) if dot else OCTET_STREAM
