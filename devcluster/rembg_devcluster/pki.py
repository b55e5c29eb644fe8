"""Certificates and keys for the local control plane, generated with `cryptography`.

One CA signs the API server's serving certificate (127.0.0.1, localhost and the in-cluster
names), the client certificates of the components, and is also the cluster-signing CA of the
controller manager. A separate RSA key pair signs service-account tokens.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Long enough for any test session or a week of local use; short enough not to matter if leaked.
VALIDITY = dt.timedelta(days=30)
# Clock skew tolerance: certificates are valid from a little before "now".
BACKDATE = dt.timedelta(minutes=5)
SERVING_DNS_NAMES = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)
SERVING_IPS = ("127.0.0.1", "10.0.0.1")


@dataclass(frozen=True)
class KeyPair:
    """A PEM certificate and its PEM private key."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)


@dataclass(frozen=True)
class ClientIdentity:
    """Who a client certificate says it is: user name (CN) and groups (O)."""

    user: str
    groups: tuple[str, ...] = ()


def _new_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def build_ca(common_name: str = "rembg-devcluster-ca") -> KeyPair:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = _new_ec_key()
    name = _name(common_name)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _sign_leaf(
    ca: KeyPair,
    subject: x509.Name,
    usages: list[x509.ObjectIdentifier],
    san: x509.SubjectAlternativeName | None,
) -> KeyPair:
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError("the CA key must be an EC key")
    key = _new_ec_key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def build_serving_cert(
    ca: KeyPair,
    common_name: str = "kube-apiserver",
    dns_names: tuple[str, ...] = SERVING_DNS_NAMES,
    ips: tuple[str, ...] = SERVING_IPS,
) -> KeyPair:
    """A TLS server certificate valid for the loopback address and the in-cluster API names."""
    san = x509.SubjectAlternativeName(
        [x509.DNSName(n) for n in dns_names]
        + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    )
    return _sign_leaf(ca, _name(common_name), [ExtendedKeyUsageOID.SERVER_AUTH], san)


def build_client_cert(ca: KeyPair, identity: ClientIdentity) -> KeyPair:
    """A client certificate: Kubernetes reads the user from CN and the groups from O."""
    return _sign_leaf(
        ca, _name(identity.user, identity.groups), [ExtendedKeyUsageOID.CLIENT_AUTH], None
    )


def build_service_account_key() -> tuple[bytes, bytes]:
    """The RSA pair that signs and verifies service-account tokens: (private, public) PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return _key_pem(key), public


def new_token() -> str:
    """A random bearer token for the static token file."""
    return secrets.token_urlsafe(32)


def build_token_auth_line(token: str, user: str, uid: str, groups: tuple[str, ...]) -> str:
    """One line of kube-apiserver's --token-auth-file: token,user,uid,"group1,group2"."""
    for field in (token, user, uid, *groups):
        if any(c in field for c in ',"\n'):
            raise ValueError(
                f"token-file field may not contain a comma, quote or newline: {field!r}"
            )
    line = f"{token},{user},{uid}"
    if groups:
        line += ',"' + ",".join(groups) + '"'
    return line


def write_private(path: Path, data: bytes) -> None:
    """Writes a secret file readable only by its owner."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)
