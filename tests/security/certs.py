"""Certificates made at test time with ``cryptography``: a CA, a server, clients, a stranger.

``make_pki(directory)`` writes PEM files and returns their paths:

- ``ca``: the CA that signs the server and the trusted client;
- ``server_cert``/``server_key``: for ``localhost`` and ``127.0.0.1``;
- ``client_cert``/``client_key``: a client certificate signed by ``ca``;
- ``rogue_ca``, ``rogue_cert``/``rogue_key``: another CA and a client it signed,
  which the server must not accept.

EC P-256 keys, valid from a minute ago for one day.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

Key = ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str, key: Key, issuer: x509.Certificate | None, issuer_key: Key, *,
    ca: bool = False, server: bool = False,
) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, certificate: x509.Certificate, key: Key) -> Path:
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path = directory / f"{name}.pem"
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(directory: Path) -> PKI:
    directory.mkdir(parents=True, exist_ok=True)
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in
            ("ca", "server", "client", "rogue_ca", "rogue")}  # fmt: skip
    ca = _certificate("resnet-serve test CA", keys["ca"], None, keys["ca"], ca=True)
    rogue_ca = _certificate("someone else's CA", keys["rogue_ca"], None, keys["rogue_ca"], ca=True)
    server = _certificate("localhost", keys["server"], ca, keys["ca"], server=True)
    client = _certificate("test client", keys["client"], ca, keys["ca"])
    rogue = _certificate("stranger", keys["rogue"], rogue_ca, keys["rogue_ca"])
    paths = {
        name: _write(directory, name, certificate, keys[name])
        for name, certificate in (("ca", ca), ("rogue_ca", rogue_ca), ("server", server),
                                  ("client", client), ("rogue", rogue))
    }  # fmt: skip
    return PKI(
        ca=paths["ca"],
        server_cert=paths["server"], server_key=directory / "server.key",
        client_cert=paths["client"], client_key=directory / "client.key",
        rogue_ca=paths["rogue_ca"],
        rogue_cert=paths["rogue"], rogue_key=directory / "rogue.key",
    )  # fmt: skip
