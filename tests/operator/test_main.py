"""Start-up of `python -m rembg_operator` that does not depend on the container's user."""

import pwd
import socket

import pytest
from rembg_operator.__main__ import operator_identity


def test_the_identity_needs_no_password_database_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # The chart runs the image as uid 65532, which has no /etc/passwd entry in it.
    def no_such_user(uid: int) -> pwd.struct_passwd:
        raise KeyError(f"getpwuid(): uid not found: {uid}")

    monkeypatch.setattr(pwd, "getpwuid", no_such_user)
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    assert operator_identity() == f"rembg-operator@{socket.gethostname()}"
