"""Known digests of rembg's model files, and the check the server runs before loading one.

rembg verifies a model only while downloading it; a file already in place is trusted as is.
The server never downloads, so it checks every file it loads against the digest rembg
2.0.86 pins in its own session classes (rembg/sessions/*.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# model name -> "algorithm:hexdigest" of <name>.onnx, copied from rembg 2.0.86's pooch calls.
KNOWN_DIGESTS: dict[str, str] = {
    "u2net": "md5:60024c5c889badc19c04ad937298a77b",
    "u2netp": "md5:8e83ca70e441ab06c318d82300c84806",
    "u2net_human_seg": "md5:c09ddc2e0104f800e3e1bb4652583d1f",
    "u2net_cloth_seg": "md5:2434d1f3cb744e0e49386c906e5a08bb",
    "silueta": "md5:55e59e0d8062d2f5d013f4725ee84782",
    "isnet-general-use": "md5:fc16ebd8b0c10d971d3513d564d01e29",
    "isnet-anime": "md5:6f184e756bb3bd901c8849220a83e38e",
    "birefnet-general": "md5:7a35a0141cbbc80de11d9c9a28f52697",
    "birefnet-general-lite": "md5:4fab47adc4ff364be1713e97b7e66334",
    "birefnet-portrait": "md5:c3a64a6abf20250d090cd055f12a3b67",
    "birefnet-dis": "md5:2d4d44102b446f33a4ebb2e56c051f2b",
    "birefnet-hrsod": "md5:c017ade5de8a50ff0fd74d790d268dda",
    "birefnet-cod": "md5:f6d0d21ca89d287f17e7afe9f5fd3b45",
    "birefnet-massive": "md5:33e726a2136a3d59eb0fdf613e31e3e9",
    "bria-rmbg": "sha256:5b486f08200f513f460da46dd701db5fbb47d79b4be4b708a19444bcd4e79958",
}

_CHUNK = 1 << 20


class ModelFileError(Exception):
    """A model file is missing, unreadable or not the file its digest names."""


@dataclass(frozen=True)
class Digest:
    algorithm: str
    hexdigest: str

    @classmethod
    def parse(cls, text: str) -> Digest:
        algorithm, sep, hexdigest = text.partition(":")
        if not sep or algorithm not in {"md5", "sha256"} or not hexdigest:
            raise ValueError(f"digest {text!r} is not of the form md5:<hex> or sha256:<hex>")
        return cls(algorithm, hexdigest.lower())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hexdigest}"


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, read in chunks so a 1 GB model never sits in memory twice."""
    hasher = hashlib.new(algorithm)
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify_file(path: Path, expected: Digest) -> None:
    """Raise ModelFileError naming the file and the reason unless it matches `expected`."""
    if not path.is_file():
        raise ModelFileError(
            f"{path}: missing (models are provisioned at build time, never fetched)"
        )
    try:
        actual = file_digest(path, expected.algorithm)
    except OSError as error:
        raise ModelFileError(f"{path}: unreadable ({error.strerror})") from error
    if actual != expected.hexdigest:
        raise ModelFileError(
            f"{path}: {expected.algorithm} is {actual}, expected {expected.hexdigest} "
            "(corrupt or wrong file)"
        )
