"""Transport security: certificate paths from flags, gRPC credentials (and
an ssl context for HTTPS clients) from them, and a local CA for
`prism up --tls` and tests. cryptography is imported only where certificates
are checked or made: the SDK imports this module.

A service has one identity, --tls-cert/--tls-key: it serves with it, and
presents it as its client certificate when it calls another service. --tls-ca
verifies the other side: the servers a service calls and, with --mtls, the
clients that call it. Without these flags everything stays plaintext, the
default. Worker processes talk over unix sockets and stay plaintext.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard, get_args

import grpc

if TYPE_CHECKING:  # cryptography is imported where certificates are checked or made (see above)
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PrivateKeyTypes


class TlsConfigError(ValueError):
    """A TLS setting that cannot work: an option without its pair, a file that cannot be read."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one side of TLS connections. ca: verifies the peer (None:
    the system's roots); cert and key: this side's certificate and its key,
    always together. `options` names the options these came from in errors:
    "--tls" -> --tls-ca, --tls-cert, --tls-key; "tls" (keyword arguments) ->
    tls_ca, tls_cert, tls_key."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    options: str = field(default="--tls", compare=False)
    # The name a server this side calls must have in its certificate, in place of the host dialled: peers
    # reached by address (an agent's or scheduler's pod IP in Kubernetes) share one name in their certificates.
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.cert is not None else ("key", "cert")
            raise TlsConfigError(f"{self.option(given)} needs {self.option(missing)}")

    def option(self, part: str) -> str:
        """The name of the option that gave `part` ("ca", "cert" or "key")."""
        return f"{self.options}-{part}" if self.options.startswith("--") else f"{self.options}_{part}"

    def read(self) -> TlsPem:
        return TlsPem(
            ca=_read(self.ca, self.option("ca")),
            cert=_read(self.cert, self.option("cert")),
            key=_read(self.key, self.option("key")),
        )

    def check(self) -> None:
        """Raises TlsConfigError unless every file is readable PEM and the key is the certificate's."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        pem = self.read()
        if pem.ca is not None:
            try:
                x509.load_pem_x509_certificates(pem.ca)
            except ValueError as exc:
                raise TlsConfigError(f"{self.option('ca')} {self.ca}: not a PEM certificate ({exc})") from None
        if pem.cert is None or pem.key is None:
            return
        try:
            cert = x509.load_pem_x509_certificates(pem.cert)[0]
        except ValueError as exc:
            raise TlsConfigError(f"{self.option('cert')} {self.cert}: not a PEM certificate ({exc})") from None
        try:
            key = serialization.load_pem_private_key(pem.key, password=None)
        except (ValueError, TypeError) as exc:
            raise TlsConfigError(
                f"{self.option('key')} {self.key}: not an unencrypted PEM private key ({exc})"
            ) from None
        if key.public_key() != cert.public_key():
            raise TlsConfigError(f"{self.option('key')} {self.key} is not the key of {self.option('cert')} {self.cert}")


@dataclass(frozen=True)
class TlsPem:
    """The contents of TlsFiles."""

    ca: bytes | None
    cert: bytes | None
    key: bytes | None = field(repr=False)


def _read(path: Path | None, option: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None


def _path(value: str | os.PathLike | None) -> Path | None:
    return None if value is None or value == "" else Path(value)


def client_tls(
    ca: str | os.PathLike | None = None,
    cert: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
    options: str = "--tls",
) -> TlsFiles | None:
    """A client's TLS from optional paths: None (plaintext) when none is given."""
    if ca is None and cert is None and key is None:
        return None
    files = TlsFiles(_path(ca), _path(cert), _path(key), options=options)
    files.check()
    return files


# ---- gRPC credentials ---------------------------------------------------------


def server_credentials(files: TlsFiles, require_client_cert: bool = False) -> grpc.ServerCredentials:
    """TLS with files.cert/key; with require_client_cert, only clients with a
    certificate signed by files.ca get through (mTLS)."""
    pem = files.read()
    if pem.cert is None or pem.key is None:
        raise TlsConfigError(f"a TLS server needs {files.option('cert')} and {files.option('key')}")
    if require_client_cert and pem.ca is None:
        raise TlsConfigError(f"requiring client certificates needs {files.option('ca')} to verify them")
    return grpc.ssl_server_credentials(
        [(pem.key, pem.cert)],
        root_certificates=pem.ca if require_client_cert else None,
        require_client_auth=require_client_cert,
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Verifies the server against files.ca (the system's roots without one);
    presents files.cert as the client certificate when there is one."""
    pem = files.read()
    return grpc.ssl_channel_credentials(root_certificates=pem.ca, private_key=pem.key, certificate_chain=pem.cert)


def add_port(server: grpc.aio.Server, address: str, files: TlsFiles | None, require_client_cert: bool = False) -> int:
    """server.add_(in)secure_port; 0 when the address cannot be bound."""
    try:
        if files is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, server_credentials(files, require_client_cert))
    except RuntimeError:  # grpc raises on some bind failures rather than returning 0
        return 0


def _with_server_name(files: TlsFiles, options: Sequence[tuple[str, object]]) -> list[tuple[str, object]]:
    """The channel options, plus the name the server's certificate is checked for where files set one."""
    return [*options, *([("grpc.ssl_target_name_override", files.server_name)] if files.server_name else [])]


def aio_channel(
    target: str,
    files: TlsFiles | None,
    options: Sequence[tuple[str, object]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
) -> grpc.aio.Channel:
    """An asyncio channel to target: TLS with files, plaintext without."""
    if files is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target, channel_credentials(files), options=_with_server_name(files, options), interceptors=interceptors
    )


def sync_channel(target: str, files: TlsFiles | None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """The blocking twin of aio_channel."""
    if files is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, channel_credentials(files), options=_with_server_name(files, options))


def ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """The same for HTTPS clients (httpx, urllib): verifies against files.ca, presents files.cert."""
    context = ssl.create_default_context(cafile=None if files.ca is None else str(files.ca))
    if files.cert is not None and files.key is not None:
        context.load_cert_chain(str(files.cert), str(files.key))
    return context


# ---- flags --------------------------------------------------------------------


def add_tls_args(parser: argparse.ArgumentParser) -> None:
    """The shared TLS flags of a service that serves gRPC and calls other services."""
    group = parser.add_argument_group(
        "TLS", "this service's gRPC server and its calls to other services (all plaintext when none is given)"
    )
    group.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="this service's certificate: it serves TLS with it and presents it when calling others",
    )
    group.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert")
    group.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="CA certificate(s) that verify the services this one calls and, with --mtls, its clients "
        "(default: the system's roots)",
    )
    group.add_argument(
        "--mtls", action="store_true", help="require client certificates signed by --tls-ca (needs --tls-ca)"
    )
    group.add_argument(
        "--tls-server-name",
        default=None,
        metavar="NAME",
        help="check the certificates of the services this one calls for NAME instead of the host "
        "dialled (services reached by pod IP, as in deploy/kubernetes/, share one name)",
    )


def tls_from_args(args: argparse.Namespace) -> TlsFiles | None:
    """The service's TLS files from add_tls_args' flags (None: plaintext);
    TlsConfigError for a flag without its pair or an unreadable file."""
    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        if args.mtls or getattr(args, "tls_server_name", None):
            raise TlsConfigError(
                f"{'--mtls' if args.mtls else '--tls-server-name'} needs --tls-ca, --tls-cert and --tls-key"
            )
        return None
    if args.tls_cert is None and args.tls_key is None:
        raise TlsConfigError("--tls-ca needs --tls-cert and --tls-key: the service serves TLS with them")
    if args.mtls and args.tls_ca is None:
        raise TlsConfigError("--mtls needs --tls-ca: the CA that signed the clients' certificates")
    files = TlsFiles(
        _path(args.tls_ca),
        _path(args.tls_cert),
        _path(args.tls_key),
        server_name=getattr(args, "tls_server_name", None),
    )
    files.check()
    return files


def transport_name(files: TlsFiles | None, mtls: bool = False) -> str:
    """How a server listens, for its start-up log line."""
    return "plaintext" if files is None else "mTLS" if mtls else "TLS"


def service_tls_args(files: TlsFiles | None, mtls: bool = False) -> list[str]:
    """The command-line flags that give a service these files (the inverse of tls_from_args)."""
    if files is None:
        return []
    out = []
    for flag, path in (("--tls-ca", files.ca), ("--tls-cert", files.cert), ("--tls-key", files.key)):
        if path is not None:
            out += [flag, str(path)]
    return out + (["--tls-server-name", files.server_name] if files.server_name else []) + (["--mtls"] if mtls else [])


# ---- a local CA ---------------------------------------------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
CA_VALID_DAYS = 3650
CERT_VALID_DAYS = 365


def _write(path: Path, data: bytes, mode: int) -> None:
    # Created with its final mode, so a key is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an existing file keeps its old mode through os.open
        os.write(fd, data)
    finally:
        os.close(fd)


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())  # fast to make; every TLS stack here takes P-256


def _can_issue(key: PrivateKeyTypes) -> TypeGuard[CertificateIssuerPrivateKeyTypes]:
    """Whether the key is of a kind that signs certificates (RSA, EC, Ed25519, ...: whichever kinds the
    installed cryptography signs with), not one made for key agreement only (DH, X25519, ...)."""
    from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

    return isinstance(key, get_args(CertificateIssuerPrivateKeyTypes))


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _san(hosts: Iterable[str]):
    from cryptography import x509

    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # in order, without repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def create_ca(directory: Path, common_name: str = "Prism local CA") -> TlsFiles:
    """A new CA in directory (ca.pem, ca-key.pem mode 0600); TlsFiles(ca, cert=ca, key=ca key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerates a little clock skew
        .not_valid_after(now + datetime.timedelta(days=CA_VALID_DAYS))
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
    ca_path, key_path = directory / CA_CERT, directory / CA_KEY
    _write(key_path, _key_pem(key), 0o600)
    _write(ca_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return TlsFiles(ca=ca_path, cert=ca_path, key=key_path)


def load_or_create_ca(directory: Path) -> TlsFiles:
    """The CA in directory, made on first use: clients keep the same CA file across restarts."""
    ca_path, key_path = directory / CA_CERT, directory / CA_KEY
    if ca_path.exists() and key_path.exists():
        files = TlsFiles(ca=ca_path, cert=ca_path, key=key_path)
        files.check()
        return files
    return create_ca(directory)


def issue_cert(ca: TlsFiles, directory: Path, name: str, hosts: Iterable[str] = LOOPBACK_HOSTS) -> TlsFiles:
    """A certificate for `name` signed by ca (made by create_ca), valid for
    hosts (IP addresses and DNS names) as a server and as a client: every
    Prism service is both. Writes NAME.pem and NAME-key.pem (mode 0600);
    returns TlsFiles(ca.ca, that cert, that key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    pem = ca.read()
    assert pem.cert is not None and pem.key is not None, "issue_cert needs the CA's certificate and key"
    ca_cert = x509.load_pem_x509_certificate(pem.cert)
    ca_key = serialization.load_pem_private_key(pem.key, password=None)
    if not _can_issue(ca_key):
        raise TlsConfigError(f"{ca.option('key')} {ca.key}: a {type(ca_key).__name__} cannot sign certificates")
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(min(now + datetime.timedelta(days=CERT_VALID_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}-key.pem"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return TlsFiles(ca=ca.ca, cert=cert_path, key=key_path)


def local_pki(directory: Path, names: Iterable[str], hosts: Iterable[str] = LOOPBACK_HOSTS) -> dict[str, TlsFiles]:
    """The CA in directory (kept if there is one) and a fresh certificate per name for hosts."""
    ca = load_or_create_ca(directory)
    hosts = list(hosts)
    return {name: issue_cert(ca, directory, name, hosts) for name in names}
