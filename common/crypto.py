"""Safe recipes for the federation's keys and certificates: the only medsilo module that imports ``cryptography``.

Everything here is a recipe over the ``cryptography`` package, never a primitive of our own:

* a federation CA (ECDSA P-384, self-signed, ``CA:TRUE, pathlen 0``),
* the SuperLink's TLS server certificate signed by that CA, with the coordinator's DNS names and IP
  addresses as subject alternative names, and its renewal (:func:`reissue_certificate`: the same key and
  names, a new validity),
* a SuperNode authentication key pair (ECDSA P-384; private key in OpenSSH format, public key as an
  OpenSSH line), which is what Flower's SuperNode authentication loads,
* checks that raise :class:`CertificateProblem` / :class:`KeyFileProblem`: a certificate not issued by the
  CA, expired or not yet valid, lacking the host in its SANs, a certificate and key that do not belong
  together, a private key file readable by others,
* a :class:`Signer` (ECDSA with SHA-256) over a site's ``node.key`` or the coordinator's ``server.key``, and
  a :class:`Verifier` over the public half (``node.pub``, a PEM public key or ``server.crt``) whose
  :meth:`Verifier.verify` raises :class:`SignatureProblem` on a bad signature; both name the key by its
  fingerprint (used to sign the audit logs, :mod:`common.audit`).

Private keys are written with mode 0600 through an atomic rename and never overwrite an existing file.
Messages name the file and the fix, never key material.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import ipaddress
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import MedsiloError
from common.io import atomic_write_bytes

#: The curve of every key medsilo makes (Flower's SuperNode authentication expects a NIST curve).
CURVE = ec.SECP384R1()


class CertificateProblem(MedsiloError):
    """A certificate cannot be trusted for the link it is meant for."""


class KeyFileProblem(MedsiloError):
    """A key file is missing, unreadable, malformed or too widely readable."""


@dataclass(frozen=True)
class Issued:
    """PEM bytes of a certificate and of its private key (PKCS#8, unencrypted: protect with 0600)."""

    certificate_pem: bytes
    private_key_pem: bytes


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode's authentication key pair in OpenSSH encodings."""

    private_openssh: bytes
    public_openssh: bytes

    @property
    def fingerprint(self) -> str:
        """SHA-256 fingerprint of the public key (safe to print and log)."""
        return public_key_fingerprint(self.public_openssh)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _name(common_name: str, organization: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def create_ca(*, federation: str, days: int = 3650) -> Issued:
    """A self-signed federation CA that may sign end-entity certificates only."""
    key = ec.generate_private_key(CURVE)
    name = _name(f"{federation} federation CA", f"medsilo federation {federation}")
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _private_pem(key))


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue_server_certificate(*, ca: Issued, hosts: list[str], federation: str, days: int = 365) -> Issued:
    """A TLS server certificate for the SuperLink, valid for every name and address in ``hosts``."""
    ca_cert = x509.load_pem_x509_certificate(ca.certificate_pem)
    ca_key = serialization.load_pem_private_key(ca.private_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyFileProblem("the federation CA key is not an elliptic-curve key; re-provision the federation")
    key = ec.generate_private_key(CURVE)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0], f"medsilo federation {federation}"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _private_pem(key))


def reissue_certificate(certificate_pem: bytes, *, ca: Issued, days: int) -> bytes:
    """The certificate re-signed by ``ca`` with a new validity period; returns its PEM bytes.

    Subject, public key and extensions (the subject alternative names among them) are those of
    ``certificate_pem``; the serial number is new and the validity runs from now for ``days`` days, at most until
    the CA expires. The certificate's private key is not needed: it stays the same (so audit logs signed with it
    before still verify against the new certificate).

    Raises
    ------
    KeyFileProblem
        The CA key is not an elliptic-curve key.
    CertificateProblem
        The CA key is not the key of the CA certificate, the certificate was not issued by that CA, or the CA
        has expired.

    """
    cert = x509.load_pem_x509_certificate(certificate_pem)
    ca_cert = x509.load_pem_x509_certificate(ca.certificate_pem)
    ca_key = serialization.load_pem_private_key(ca.private_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise KeyFileProblem("the federation CA key is not an elliptic-curve key; use the ca.key of this federation")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if ca_key.public_key().public_bytes(*spki) != ca_cert.public_key().public_bytes(*spki):
        raise CertificateProblem("the CA key is not the private key of the CA certificate; use the ca.key and "
                                 "ca.crt written together by `medsilo provision`")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateProblem(
            f"the certificate to renew was not issued by the CA '{ca_cert.subject.rfc4514_string()}'; renew it with "
            "the CA of its own federation") from None
    now = _now()
    if now >= ca_cert.not_valid_after_utc:
        raise CertificateProblem(f"the federation CA expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
                                 f"{_renewal_fix(ca_cert)}")
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca_cert.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
    )
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(ca_key, hashes.SHA384()).public_bytes(serialization.Encoding.PEM)


def create_node_keys(*, comment: str) -> NodeKeyPair:
    """A SuperNode authentication key pair (OpenSSH encodings, as Flower's SuperNode loads them)."""
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return NodeKeyPair(private, public + b" " + comment.encode("ascii", "replace") + b"\n")


def public_key_fingerprint(public_openssh: bytes) -> str:
    """The key's fingerprint as ``ssh-keygen -lf`` prints it: ``SHA256:`` and unpadded base64 of the blob's SHA-256.

    A hospital and the coordinator can compare it out of band with OpenSSH's own tools (the comment is ignored).
    """
    parts = public_openssh.split()
    if len(parts) < 2:
        raise KeyFileProblem("not an OpenSSH public key line ('<type> <base64> [comment]')")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise KeyFileProblem("the key's base64 part does not decode; copy the whole .pub line again") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


# ---------------------------------------------------------------------------- files
def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write a private key with mode 0600; refuse to replace an existing file unless ``overwrite``."""
    if path.exists() and not overwrite:
        raise KeyFileProblem(f"{path} already exists; medsilo never overwrites a private key. Move it away first.")
    atomic_write_bytes(path, data, mode=0o600)


def write_public(path: Path, data: bytes, *, overwrite: bool = False) -> None:
    """Write a certificate or public key (mode 0644), refusing to replace a different existing file."""
    if path.exists() and not overwrite and path.read_bytes() != data:
        raise KeyFileProblem(f"{path} already exists with different content; move it away first.")
    atomic_write_bytes(path, data, mode=0o644)


def check_private_key_file(path: Path) -> None:
    """Raise unless ``path`` exists, is a regular file and is readable by its owner only."""
    if not path.is_file():
        raise KeyFileProblem(f"private key {path} is missing; copy it from your startup kit (mode 0600).")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileProblem(
            f"private key {path} has permissions {mode:04o}, readable by other users; "
            f"run `chmod 600 {path}` (and check who has already read it)."
        )
    if not os.access(path, os.R_OK):
        raise KeyFileProblem(f"private key {path} is not readable by this user; fix its owner.")


def _load_cert(path: Path) -> x509.Certificate:
    if not path.is_file():
        raise CertificateProblem(f"certificate {path} is missing; copy it from your startup kit.")
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise CertificateProblem(f"{path} is not a PEM certificate; copy it again from your startup kit.") from None


def check_issued_by(cert_path: Path, ca_path: Path) -> None:
    """Raise unless the certificate at ``cert_path`` was signed by the CA at ``ca_path``."""
    cert, ca = _load_cert(cert_path), _load_cert(ca_path)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateProblem(
            f"{cert_path} was not issued by the CA in {ca_path} (CA subject "
            f"'{ca.subject.rfc4514_string()}'); use the ca.crt from the same federation's kits."
        ) from None


def check_valid_now(cert_path: Path, *, now: dt.datetime | None = None) -> None:
    """Raise if the certificate is expired or not yet valid."""
    cert = _load_cert(cert_path)
    now = now or _now()
    if now < cert.not_valid_before_utc:
        raise CertificateProblem(
            f"{cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check this machine's clock."
        )
    if now > cert.not_valid_after_utc:
        raise CertificateProblem(f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; {_renewal_fix(cert)}")


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _renewal_fix(cert: x509.Certificate) -> str:
    if _is_ca(cert):
        return ("the federation CA cannot be renewed in place: the coordinator provisions a new federation and "
                "sends every hospital its new kit.")
    return ("renew it where the kits folder is kept, with the CA key in KITS/ca/ca.key: `medsilo provision "
            "FEDERATION.toml --out KITS --renew`, then copy KITS/coordinator/server.crt to the coordinator and "
            "restart the SuperLink.")


def certificate_not_after(cert_path: Path) -> dt.datetime:
    """When the certificate at ``cert_path`` expires (UTC)."""
    return _load_cert(cert_path).not_valid_after_utc


def certificate_hosts(cert_path: Path) -> list[str]:
    """The DNS names and IP addresses in a certificate's subject alternative names."""
    cert = _load_cert(cert_path)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + [
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    ]


def check_certificate_names(cert_path: Path, host: str) -> None:
    """Raise unless ``host`` is one of the certificate's subject alternative names."""
    hosts = certificate_hosts(cert_path)
    if host not in hosts:
        raise CertificateProblem(
            f"{cert_path} is valid for {', '.join(hosts) or 'no host'}, not for '{host}'; connect to one of those "
            "names or add the host to [coordinator].hosts and re-provision."
        )


def check_key_matches_certificate(key_path: Path, cert_path: Path) -> None:
    """Raise unless the private key at ``key_path`` belongs to the certificate at ``cert_path``."""
    cert = _load_cert(cert_path)
    key = _load_private_pem(key_path)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CertificateProblem(
            f"{key_path} is not the private key of {cert_path}; use the server.key provisioned with that certificate."
        )


def _load_private_pem(path: Path) -> ec.EllipticCurvePrivateKey:
    check_private_key_file(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise KeyFileProblem(f"{path} is not an unencrypted PEM private key; copy it again from the kit.") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileProblem(f"{path} is not an elliptic-curve key; re-provision the federation.")
    return key


def load_node_public_key(path: Path) -> bytes:
    """Read and validate an OpenSSH public key line (an EC key on a NIST curve)."""
    if not path.is_file():
        raise KeyFileProblem(f"public key {path} is missing; it is written by `medsilo provision`.")
    data = path.read_bytes()
    try:
        key = serialization.load_ssh_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileProblem(f"{path} is not an OpenSSH public key line; re-provision the site.") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileProblem(f"{path} is not an elliptic-curve key; SuperNode authentication needs ECDSA.")
    return data


def check_node_private_key(path: Path, public_path: Path | None = None) -> None:
    """Raise unless ``path`` is a 0600 OpenSSH EC private key (matching ``public_path`` when given)."""
    check_private_key_file(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise KeyFileProblem(
            f"{path} is not an unencrypted OpenSSH private key; copy node.key from your kit."
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileProblem(f"{path} is not an elliptic-curve key; SuperNode authentication needs ECDSA.")
    if public_path is not None:
        expected = serialization.load_ssh_public_key(load_node_public_key(public_path))
        mine = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        theirs = expected.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        if mine != theirs:
            raise KeyFileProblem(f"{path} does not belong to {public_path}; use the key pair from the same kit.")


# ---------------------------------------------------------------------------- signing
class SignatureProblem(MedsiloError):
    """A signature does not verify with the expected public key."""


_OPENSSH_PRIVATE = b"-----BEGIN OPENSSH PRIVATE KEY-----"
_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM = b"-----BEGIN "


def _spki_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode("ascii").rstrip("=")


def _openssh_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    return public_key_fingerprint(key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


def _fingerprints(key: ec.EllipticCurvePublicKey) -> frozenset[str]:
    return frozenset({_openssh_fingerprint(key), _spki_fingerprint(key)})


@dataclass(frozen=True)
class Verifier:
    """Checks ECDSA (SHA-256) signatures made by one public key.

    Make one with :func:`load_verifier` (a file) or :func:`verifier_from_public_bytes`.

    Attributes
    ----------
    fingerprint
        The key's name, safe to print: ``ssh-keygen -lf`` style when the key came as an OpenSSH line,
        ``SHA256:`` and unpadded base64 of the SubjectPublicKeyInfo DER when it came as PEM or a certificate.
    aliases
        Both fingerprint styles of the same key: a signature naming either is this key's.

    """

    fingerprint: str
    aliases: frozenset[str]
    _public_key: ec.EllipticCurvePublicKey = field(repr=False, compare=False)

    def matches(self, fingerprint: object) -> bool:
        """Whether ``fingerprint`` (either style) names this verifier's key."""
        return isinstance(fingerprint, str) and fingerprint in self.aliases

    def verify(self, data: bytes, signature: str) -> None:
        """Check ``signature`` (base64 of a DER ECDSA signature) over ``data``.

        Parameters
        ----------
        data
            The signed bytes.
        signature
            What :meth:`Signer.sign` returned.

        Raises
        ------
        SignatureProblem
            The signature is malformed or was not made over ``data`` by this key.

        """
        try:
            der = base64.b64decode(signature.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError, AttributeError):
            raise SignatureProblem(
                f"the signature is not base64 text; it was not made by {self.fingerprint} (corrupted or forged)"
            ) from None
        try:
            self._public_key.verify(der, data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SignatureProblem(
                f"the signature does not verify with {self.fingerprint}: the signed data was changed, or another "
                "key signed it"
            ) from None


@dataclass(frozen=True)
class Signer:
    """Signs bytes with a private EC key (ECDSA with SHA-256); make one with :func:`load_signer`.

    Attributes
    ----------
    fingerprint
        The public key's name, safe to print and to store beside each signature (same style as
        :attr:`Verifier.fingerprint` for the matching public file: ``node.pub`` or ``server.crt``).

    """

    fingerprint: str
    _private_key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)

    def sign(self, data: bytes) -> str:
        """Sign ``data``; return base64 text of the DER-encoded ECDSA signature."""
        der = self._private_key.sign(data, ec.ECDSA(hashes.SHA256()))
        return base64.b64encode(der).decode("ascii")

    def verifier(self) -> Verifier:
        """The :class:`Verifier` of this signer's public key."""
        public = self._private_key.public_key()
        return Verifier(self.fingerprint, _fingerprints(public), public)


def load_signer(path: Path) -> Signer:
    """Load a private key for signing: a site's ``node.key`` (OpenSSH) or the coordinator's ``server.key`` (PEM).

    Parameters
    ----------
    path
        An unencrypted EC private key, mode 0600.

    Returns
    -------
    Signer
        Named ``ssh-keygen -lf`` style for an OpenSSH key (the fingerprint the kit prints for ``node.pub``), by
        the SubjectPublicKeyInfo digest for a PEM key (what :func:`load_verifier` gives for ``server.crt``).

    Raises
    ------
    KeyFileProblem
        The file is missing, readable by others, not a private key, encrypted, or not an EC key.

    """
    path = Path(path)
    check_private_key_file(path)
    data = path.read_bytes()
    stripped = data.lstrip()
    key: object
    try:
        if stripped.startswith(_OPENSSH_PRIVATE):
            key = serialization.load_ssh_private_key(data, password=None)
        elif stripped.startswith(_PEM) and b"PRIVATE KEY-----" in stripped.split(b"\n", 1)[0]:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            raise KeyFileProblem(
                f"{path} is not a private key (expected an OpenSSH or PEM private key: a site's node.key or the "
                "coordinator's server.key); a public key or certificate cannot sign. Give the kit's private key."
            )
    except TypeError:
        raise KeyFileProblem(
            f"{path} is encrypted with a passphrase; medsilo signs with the kit's unencrypted key (mode 0600). "
            "Use node.key or server.key as provisioned."
        ) from None
    except (ValueError, binascii.Error, UnsupportedAlgorithm):
        raise KeyFileProblem(
            f"{path} could not be parsed as a private key (damaged or truncated); copy node.key or server.key "
            "again from the kit."
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileProblem(
            f"{path} holds a {type(key).__name__.lstrip('_')} key, not an elliptic-curve key; medsilo signs with "
            "ECDSA: use the node.key or server.key that `medsilo provision` wrote."
        )
    public = key.public_key()
    fingerprint = _openssh_fingerprint(public) if stripped.startswith(_OPENSSH_PRIVATE) else _spki_fingerprint(public)
    return Signer(fingerprint, key)


def verifier_from_public_bytes(data: bytes, *, source: str = "the public key") -> Verifier:
    """A :class:`Verifier` from an OpenSSH public key line, a PEM public key or an X.509 certificate (PEM).

    Parameters
    ----------
    data
        The file's bytes: a site's ``node.pub``, ``-----BEGIN PUBLIC KEY-----`` or the coordinator's
        ``server.crt``.
    source
        How messages name the input (a file path).

    Raises
    ------
    KeyFileProblem
        The bytes are a private key, none of the accepted formats, or not an elliptic-curve key.

    """
    stripped = data.strip()
    first = stripped.split(b"\n", 1)[0]
    key: object
    if stripped.startswith(_PEM) and b"PRIVATE KEY" in first:
        raise KeyFileProblem(
            f"{source} is a private key; verifying needs only the public half: a site's node.pub or the "
            "coordinator's server.crt (keep private keys off the machine that verifies)."
        )
    try:
        if stripped.startswith(_CERTIFICATE):
            fingerprint_of = _spki_fingerprint
            key = x509.load_pem_x509_certificate(stripped).public_key()
        elif stripped.startswith(_PEM):
            fingerprint_of = _spki_fingerprint
            key = serialization.load_pem_public_key(stripped)
        else:
            fingerprint_of = _openssh_fingerprint
            key = serialization.load_ssh_public_key(stripped)
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError, UnsupportedAlgorithm):
        raise KeyFileProblem(
            f"{source} is not a public key medsilo can read (expected an OpenSSH public key line such as a site's "
            "node.pub, a PEM public key, or a PEM certificate such as the coordinator's server.crt); "
            "copy it again from the kit."
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileProblem(
            f"{source} holds a {type(key).__name__.lstrip('_')} key, not an elliptic-curve key; medsilo signs "
            "with ECDSA: use the node.pub or server.crt that `medsilo provision` wrote."
        )
    return Verifier(fingerprint_of(key), _fingerprints(key), key)


def load_verifier(path: Path) -> Verifier:
    """A :class:`Verifier` from a file: a site's ``node.pub``, a PEM public key or the coordinator's ``server.crt``.

    Raises
    ------
    KeyFileProblem
        The file is missing, unreadable or not a usable public key; the message names the file and the fix.

    """
    path = Path(path)
    if not path.is_file():
        raise KeyFileProblem(
            f"public key {path} is missing; give a site's node.pub, a PEM public key or the coordinator's server.crt."
        )
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileProblem(f"public key {path} cannot be read ({exc.strerror}); fix its permissions.") from None
    return verifier_from_public_bytes(data, source=str(path))
