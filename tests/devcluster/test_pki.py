"""Certificates the control plane uses: chains, names and usages are what Kubernetes expects."""

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from rembg_devcluster import pki


@pytest.fixture(scope="module")
def ca() -> pki.KeyPair:
    return pki.build_ca()


def test_ca_is_a_ca_that_signs_itself(ca: pki.KeyPair) -> None:
    cert = ca.certificate
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    cert.verify_directly_issued_by(cert)


def test_serving_cert_covers_loopback_and_in_cluster_names(ca: pki.KeyPair) -> None:
    cert = pki.build_serving_cert(ca).certificate
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert {"localhost", "kubernetes.default.svc"} <= set(san.get_values_for_type(x509.DNSName))
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_client_cert_carries_user_in_cn_and_groups_in_o(ca: pki.KeyPair) -> None:
    identity = pki.ClientIdentity("system:kube-scheduler", ("g1", "g2"))
    cert = pki.build_client_cert(ca, identity).certificate
    cert.verify_directly_issued_by(ca.certificate)
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [a.value for a in cn] == ["system:kube-scheduler"]
    assert [a.value for a in orgs] == ["g1", "g2"]
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_leaf_key_matches_its_certificate(ca: pki.KeyPair) -> None:
    pair = pki.build_serving_cert(ca)
    key = serialization.load_pem_private_key(pair.key_pem, password=None)
    assert key.public_key() == pair.certificate.public_key()


def test_service_account_keys_sign_and_verify() -> None:
    private_pem, public_pem = pki.build_service_account_key()
    private = serialization.load_pem_private_key(private_pem, password=None)
    public = serialization.load_pem_public_key(public_pem)
    assert isinstance(private, rsa.RSAPrivateKey)
    assert isinstance(public, rsa.RSAPublicKey)
    signature = private.sign(b"token", padding.PKCS1v15(), SHA256())
    public.verify(signature, b"token", padding.PKCS1v15(), SHA256())


def test_token_auth_line_format() -> None:
    line = pki.build_token_auth_line("t0k", "admin", "uid-1", ("system:masters", "devs"))
    assert line == 't0k,admin,uid-1,"system:masters,devs"'
    assert pki.build_token_auth_line("t", "u", "i", ()) == "t,u,i"


def test_token_auth_line_rejects_fields_that_would_break_the_csv() -> None:
    with pytest.raises(ValueError, match="comma"):
        pki.build_token_auth_line("t", "a,b", "i", ())


def test_tokens_are_random_and_long() -> None:
    tokens = {pki.new_token() for _ in range(20)}
    assert len(tokens) == 20
    assert all(len(t) >= 40 for t in tokens)


def test_private_files_are_owner_only(tmp_path) -> None:
    path = tmp_path / "pki" / "secret.key"
    pki.write_private(path, b"secret")
    assert path.read_bytes() == b"secret"
    assert path.stat().st_mode & 0o777 == 0o600
