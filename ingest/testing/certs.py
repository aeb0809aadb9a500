"""Throwaway PKI for tests and local runs: a CA, a server and clients for mutual TLS.

Never use these for anything real: the keys are written unencrypted next to the certificates.

``python -m ingest.testing.certs OUT_DIR [--client-id ID]`` writes one set; ``make_certs`` returns a
:class:`CertBundle` naming every file. Keys are EC P-256 (fast to generate, accepted by Mosquitto
and by HM's broker) in unencrypted PKCS#8 PEM, the format HM's console hands out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_CLIENT_ID = "hm-fleet-ingest-test"
SERVER_HOSTNAME = "localhost"
SERVER_IP = "127.0.0.1"
# RFC 2606 reserves ``.invalid``: no resolver answers it. Named by the hostname-mismatch cert.
WRONG_HOSTNAME = "not-this-broker.invalid"
VALIDITY = dt.timedelta(days=30)
# Backdated start: a few minutes of clock skew must not make certificates "not yet valid".
CLOCK_SKEW = dt.timedelta(minutes=5)

PrivateKey = ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class CertBundle:
    """Paths of one generated set. ``client_id`` is the CN of ``client_cert``."""

    directory: Path
    client_id: str
    ca_file: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    expired_client_cert: Path
    expired_client_key: Path
    other_ca_file: Path
    other_client_cert: Path
    other_client_key: Path
    wrong_host_server_cert: Path
    wrong_host_server_key: Path


def _new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hm-fleet-ingest throwaway test PKI"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _make_ca(common_name: str, now: dt.datetime) -> tuple[x509.Certificate, PrivateKey]:
    key = _new_key()
    subject = _name(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
    return cert, key


def _make_leaf(
    ca: tuple[x509.Certificate, PrivateKey],
    common_name: str,
    *,
    server_names: Sequence[str] = (),
    server_ips: Sequence[str] = (),
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[x509.Certificate, PrivateKey]:
    ca_cert, ca_key = ca
    key = _new_key()
    is_server = bool(server_names or server_ips)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if is_server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if is_server:
        # Hostname checks read only the SAN (RFC 6125 6.4.4): the CN alone would not match.
        alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in server_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in server_ips]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key: PrivateKey) -> Path:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Owner-only from the first byte: the file never exists with looser permissions.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return path


def _write_pair(
    directory: Path, stem: str, pair: tuple[x509.Certificate, PrivateKey]
) -> tuple[Path, Path]:
    return (
        _write_cert(directory / f"{stem}.crt", pair[0]),
        _write_key(directory / f"{stem}.key", pair[1]),
    )


def make_certs(directory: Path, client_id: str = DEFAULT_CLIENT_ID) -> CertBundle:
    """Generate a complete throwaway set into ``directory`` (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    start, end = now - CLOCK_SKEW, now + VALIDITY

    ca = _make_ca("hm-fleet-ingest test CA", now)
    server = _make_leaf(
        ca,
        SERVER_HOSTNAME,
        server_names=[SERVER_HOSTNAME],
        server_ips=[SERVER_IP],
        not_before=start,
        not_after=end,
    )
    wrong_host = _make_leaf(
        ca, WRONG_HOSTNAME, server_names=[WRONG_HOSTNAME], not_before=start, not_after=end
    )
    client = _make_leaf(ca, client_id, not_before=start, not_after=end)
    expired = _make_leaf(
        ca, client_id, not_before=now - 2 * VALIDITY, not_after=now - dt.timedelta(days=1)
    )
    other_ca = _make_ca("unrelated test CA", now)
    other_client = _make_leaf(other_ca, client_id, not_before=start, not_after=end)

    ca_file, ca_key = _write_pair(directory, "ca", ca)
    other_ca_file, _ = _write_pair(directory, "other-ca", other_ca)
    server_cert, server_key = _write_pair(directory, "server", server)
    wrong_cert, wrong_key = _write_pair(directory, "server-wrong-host", wrong_host)
    client_cert, client_key = _write_pair(directory, "client", client)
    expired_cert, expired_key = _write_pair(directory, "client-expired", expired)
    other_cert, other_key = _write_pair(directory, "other-client", other_client)
    return CertBundle(
        directory=directory,
        client_id=client_id,
        ca_file=ca_file,
        ca_key=ca_key,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        expired_client_cert=expired_cert,
        expired_client_key=expired_key,
        other_ca_file=other_ca_file,
        other_client_cert=other_cert,
        other_client_key=other_key,
        wrong_host_server_cert=wrong_cert,
        wrong_host_server_key=wrong_key,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.testing.certs",
        description="Write a throwaway CA, server and client certificates for local runs. "
        "Never use them for anything real.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write into (created if missing)")
    parser.add_argument(
        "--client-id",
        default=DEFAULT_CLIENT_ID,
        help=f"CN of the client certificate (default {DEFAULT_CLIENT_ID})",
    )
    args = parser.parse_args(argv)
    bundle = make_certs(args.out_dir, args.client_id)
    print(f"wrote throwaway certificates to {bundle.directory}")
    print("[mqtt]")
    print(f'client_id = "{bundle.client_id}"')
    print(f'ca_file = "{bundle.ca_file}"')
    print(f'cert_file = "{bundle.client_cert}"')
    print(f'key_file = "{bundle.client_key}"')
    return 0


if __name__ == "__main__":
    sys.exit(main())
