"""TLS for the gRPC ports, from PEM files named in the processes' configuration:
server credentials (mTLS when a client CA is given: a client without a certificate
that CA signed cannot connect) and client credentials (the CA that signed the
server's certificate, and a client certificate for mTLS).

Files are read once, when a server or channel is made; a missing or unreadable
file is a ValueError that names the option, so the CLI reports it plainly.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path, option: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{option}: cannot read {path}: {e.strerror}") from e
    if b"-----BEGIN " not in data:
        raise ValueError(f"{option}: {path} is not a PEM file")
    return data


def server_credentials(cert_file: Path | None, key_file: Path | None,
                       client_ca_file: Path | None = None, *,
                       prefix: str = "tls_") -> grpc.ServerCredentials | None:
    """TLS credentials for a server port, or None for a plain port (no cert and key).
    `prefix` names the options in errors (tls_cert_file, ...)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError(f"{prefix}cert_file and {prefix}key_file go together")
    if cert_file is None or key_file is None:
        if client_ca_file is not None:
            raise ValueError(f"{prefix}client_ca_file needs TLS: set {prefix}cert_file and "
                             f"{prefix}key_file too")
        return None
    pair = (_read(key_file, f"{prefix}key_file"), _read(cert_file, f"{prefix}cert_file"))
    if client_ca_file is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials([pair], root_certificates=_read(client_ca_file,
                                                                       f"{prefix}client_ca_file"),
                                       require_client_auth=True)


def channel_credentials(ca_file: Path | None = None, cert_file: Path | None = None,
                        key_file: Path | None = None, *,
                        prefix: str = "") -> grpc.ChannelCredentials:
    """TLS credentials for a client: the server is checked against `ca_file` (None: the
    system's roots); `cert_file` and `key_file` are this client's, for mTLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError(f"{prefix}cert_file and {prefix}key_file go together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, f"{prefix}ca_file") if ca_file else None,
        private_key=_read(key_file, f"{prefix}key_file") if key_file else None,
        certificate_chain=_read(cert_file, f"{prefix}cert_file") if cert_file else None)
