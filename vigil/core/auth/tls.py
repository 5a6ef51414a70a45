"""TLS: the server's credentials, a machine's identity in its client certificate, and a
development certificate authority for trying TLS and mutual TLS locally.

A machine's client certificate names it in a URI subject alternative name,
`vigil://machine/<machine id>`; under mutual TLS that certificate alone proves the
daemon is that machine. Certificates come from the `cryptography` library (no
hand-built ASN.1).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from vigil.core.errors import ConfigError

MACHINE_URI = "vigil://machine/"


def machine_from_peer(auth_context: Mapping[str, Sequence[bytes]]) -> str | None:
    """The machine id a verified client certificate names, if any."""
    pems = auth_context.get("x509_pem_cert") or []
    if not pems:
        return None
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pems[0])
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(MACHINE_URI) and len(uri) > len(MACHINE_URI):
            return uri.removeprefix(MACHINE_URI)
    return None


@dataclass(frozen=True)
class ServerTls:
    """A listener's TLS: its certificate and key, and for mutual TLS the CA whose client
    certificates it requires."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        cert, key = _read(self.cert_file, "--tls-cert"), _read(self.key_file, "--tls-key")
        ca = _read(self.client_ca_file, "--tls-client-ca") if self.client_ca_file else None
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: {exc.strerror or exc}") from None


# -- a development certificate authority ----------------------------------------------


def _write(path: Path, data: bytes, private: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def dev_ca(
    out: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    machines: Sequence[str] = (),
    clients: Sequence[str] = ("client",),
    days: int = 30,
) -> list[Path]:
    """Write ca.pem (and ca.key), server.pem/.key for `hosts`, one client certificate per
    machine (`machine-ID.pem/.key`, naming it) and per plain client (`NAME.pem/.key`,
    naming nobody: transport only). Keys are owner-only. Returns the files written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    until = now + dt.timedelta(days=days)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Vigil development CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(until)
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
        .sign(ca_key, hashes.SHA256())
    )
    written = []

    def issue(name: str, cn: str, sans: list[x509.GeneralName], server: bool) -> None:
        k = key()
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            # A server certificate may also be presented as a client's (a task service
            # following the liveness service under mutual TLS).
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca_name)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(until)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), False)
        _write(out / f"{name}.key", pem_key(k), True)
        written.extend([out / f"{name}.pem", out / f"{name}.key"])

    _write(out / "ca.pem", ca.public_bytes(serialization.Encoding.PEM), False)
    _write(out / "ca.key", pem_key(ca_key), True)
    written.extend([out / "ca.pem", out / "ca.key"])
    server_sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            server_sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            server_sans.append(x509.DNSName(host))
    issue("server", hosts[0] if hosts else "vigil", server_sans, server=True)
    for machine in machines:
        issue(
            f"machine-{machine}",
            f"machine {machine}",
            [x509.UniformResourceIdentifier(MACHINE_URI + machine)],
            server=False,
        )
    for client in clients:
        issue(client, client, [], server=False)
    return written
