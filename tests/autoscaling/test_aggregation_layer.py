"""The local control plane's aggregation layer, which serves prometheus-adapter's
custom.metrics.k8s.io: front-proxy flags on kube-apiserver and the PKI they point at."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID
from rembg_devcluster import flags
from rembg_devcluster.cluster import write_pki
from rembg_devcluster.layout import Layout, Ports

PORTS = Ports(etcd_client=1, etcd_peer=2, apiserver=3, controller_manager=4, scheduler=5)


def _flag_map(argv: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in argv[1:] if "=" in a)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_apiserver_runs_the_front_proxy(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    args = _flag_map(flags.build_apiserver_args(Path("/kube-apiserver"), layout, PORTS))
    assert args["requestheader-allowed-names"] == flags.FRONT_PROXY_CLIENT
    assert args["requestheader-username-headers"] == "X-Remote-User"
    assert args["requestheader-group-headers"] == "X-Remote-Group"
    assert args["requestheader-extra-headers-prefix"] == "X-Remote-Extra-"
    write_pki(layout)
    front_ca = _cert(Path(args["requestheader-client-ca-file"]))
    client = _cert(Path(args["proxy-client-cert-file"]))
    assert Path(args["proxy-client-key-file"]).stat().st_mode & 0o077 == 0
    # The proxy's certificate is signed by the front-proxy CA, a CA of its own: a client
    # certificate of the cluster CA must not be able to pass as the proxy.
    assert client.issuer == front_ca.subject
    assert front_ca.subject != _cert(layout.ca_cert).subject
    cn = client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == flags.FRONT_PROXY_CLIENT
    client.verify_directly_issued_by(front_ca)
