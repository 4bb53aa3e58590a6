"""A test certificate authority for ``tls+tcp://`` (``qmt-relay tls make-test-ca DIR``).

Writes, with the ``cryptography`` library (the ``tls`` extra):

- ``ca.pem`` / ``ca.key``: a self-signed CA (what subscribers trust: ``Subscriber(ca=...)``,
  and the relay's ``security.tls.ca`` when client certificates are required);
- ``server.pem`` / ``server.key``: the relay's certificate, for the given host names and IP
  addresses (``security.tls.cert`` / ``security.tls.key``);
- ``client.pem`` / ``client.key``: one client certificate (``Subscriber(cert=, key=)``).

Keys are ECDSA P-256, unencrypted, readable by the owner only. This is for tests and trials
on a trusted LAN; a production deployment uses certificates from its own CA.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from typing import Dict, List, Sequence, Union

__all__ = ["make_test_ca"]

_IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]


def make_test_ca(directory: str, *, hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
                 days: int = 365, client: str = "qmt-relay-client") -> Dict[str, str]:
    """Create a CA, a server and a client certificate in ``directory``.

    Args:
        directory: where the PEM files go (created if missing; existing files replaced).
        hosts: DNS names and IP addresses the server certificate is valid for.
        days: validity of every certificate.
        client: the client certificate's common name.

    Returns:
        ``{"ca": path, "ca_key": ..., "server": ..., "server_key": ..., "client": ...,
        "client_key": ...}``.

    Raises:
        ImportError: ``cryptography`` is not installed (``pip install "qmt-relay[tls]"``).
    """
    from cryptography import x509  # noqa: PLC0415 - optional extra
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: PLC0415

    os.makedirs(directory, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write(stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        cert_path = os.path.join(directory, f"{stem}.pem")
        key_path = os.path.join(directory, f"{stem}.key")
        with open(cert_path, "wb") as out:
            out.write(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("qmt-relay test CA")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(until)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca, ca_key)

    def issue(common: str, usage: x509.ObjectIdentifier,
              alt: List[x509.GeneralName]) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca_name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(until)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                  critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                       ca_key.public_key()), critical=False))
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        stem = "server" if usage == ExtendedKeyUsageOID.SERVER_AUTH else "client"
        write(stem, builder.sign(ca_key, hashes.SHA256()), key)

    alt: List[x509.GeneralName] = []
    for host in hosts:
        try:
            ip: _IP = ipaddress.ip_address(host)
        except ValueError:
            alt.append(x509.DNSName(host))
        else:
            alt.append(x509.IPAddress(ip))
    issue(hosts[0] if hosts else "localhost", ExtendedKeyUsageOID.SERVER_AUTH, alt)
    issue(client, ExtendedKeyUsageOID.CLIENT_AUTH, [])
    paths: Dict[str, str] = {}
    for stem in ("ca", "server", "client"):
        paths[stem] = os.path.join(directory, f"{stem}.pem")
        paths[f"{stem}_key"] = os.path.join(directory, f"{stem}.key")
    return paths
