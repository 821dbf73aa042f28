"""Signed packages: Ed25519 signatures over `manifest.json` and the trust policy that checks them.

The signature covers the manifest's exact bytes. The manifest holds the size and sha256 of every
file (ONNX graphs, ORT builds, TensorRT engines, tokenizer), so a valid signature plus verified
hashes covers every byte the runtime reads. The signature lives beside the manifest in
`manifest.sig`, a small JSON record (key id + signature); it is never listed in the manifest (it
cannot hash itself), and package verification ignores unlisted files, so an unsigned reader is not
disturbed by it.

Trust policies: "hashes" (the default) verifies the manifest and every file's hash and ignores
signatures; "signed" also requires a valid signature by one of the trusted public keys. The
policy comes from the caller (`sdk.Pipeline(trust=...)`) or from MMEDGE_TRUST / MMEDGE_TRUSTED_KEYS.
Torch-free; `cryptography` is imported only when a key or signature is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmedge.errors import ConfigError, IntegrityError, InvalidInputError
from mmedge.runtime.manifest import MANIFEST_NAME

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SIGNATURE_NAME = "manifest.sig"
SIGNATURE_SCHEMA = "mmedge.signature/1"
ALGORITHM = "ed25519"
TRUST_MODES = ("hashes", "signed")
TRUST_ENV = "MMEDGE_TRUST"
KEYS_ENV = "MMEDGE_TRUSTED_KEYS"
PRIVATE_KEY_NAME = "mmedge-signing.key"
PUBLIC_KEY_NAME = "mmedge-signing.pub"
MAX_SIGNATURE_BYTES = 4096
MAX_KEY_FILE_BYTES = 1 << 20
_SIG_KEYS = {"schema", "algorithm", "key_id", "signature"}
_PEM_BEGIN = "-----BEGIN PUBLIC KEY-----"
_PEM_END = "-----END PUBLIC KEY-----"


def key_id(public_raw: bytes) -> str:
    """A short, stable name of a public key: the first 128 bits of the sha256 of its raw bytes."""
    return f"{ALGORITHM}:{hashlib.sha256(public_raw).hexdigest()[:32]}"


@dataclass(frozen=True)
class TrustPolicy:
    """What a package must show before it is opened: its hashes ("hashes"), or also a signature by
    one of `keys` ("signed"; key id -> raw 32-byte Ed25519 public key)."""

    mode: str = "hashes"
    keys: Mapping[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in TRUST_MODES:
            raise InvalidInputError(f"trust must be one of {list(TRUST_MODES)}, got {self.mode!r}")
        if self.mode == "signed" and not self.keys:
            raise ConfigError(
                f'trust="signed" needs trusted public keys (trusted_keys=FILE or {KEYS_ENV}=FILE)'
            )

    def check(self, root: Path, manifest_bytes: bytes) -> str | None:
        """Check the signature of exactly these manifest bytes; the signer's key id, or None when
        the policy does not look at signatures. Raises IntegrityError when the package is refused."""
        if self.mode != "signed":
            return None
        sig = read_signature(root)
        if sig is None:
            raise IntegrityError(
                f"{root} is not signed (no {SIGNATURE_NAME}) and the trust policy requires a signature "
                "by a trusted key"
            )
        kid, signature = sig
        public = self.keys.get(kid)
        if public is None:
            raise IntegrityError(f"{root} is signed by key {kid}, which is not a trusted key")
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, manifest_bytes)
        except InvalidSignature:
            raise IntegrityError(
                f"{root}: the signature in {SIGNATURE_NAME} does not match {MANIFEST_NAME}; "
                "the manifest was changed after signing"
            ) from None
        return kid


def trust_policy(trust: str | None = None, trusted_keys: str | os.PathLike[str] | None = None) -> TrustPolicy:
    """The policy for `trust` and `trusted_keys`. Arguments win: `trusted_keys` without `trust`
    means "signed". What is left None comes from MMEDGE_TRUST / MMEDGE_TRUSTED_KEYS; with no mode
    set anywhere, the policy is "hashes"."""
    if trust is None and trusted_keys is not None:
        trust = "signed"  # keys given without a mode: the caller wants them checked
    if trust is None:
        env = os.environ.get(TRUST_ENV, "")
        if env and env not in TRUST_MODES:
            raise ConfigError(f"{TRUST_ENV}={env!r} is not one of {list(TRUST_MODES)}")
        trust = env or "hashes"
    if trust not in TRUST_MODES:
        raise InvalidInputError(f"trust must be one of {list(TRUST_MODES)}, got {trust!r}")
    if trust == "hashes":
        return TrustPolicy()
    path = trusted_keys if trusted_keys is not None else os.environ.get(KEYS_ENV) or None
    if path is None:
        raise ConfigError(
            f'trust="signed" needs a file of trusted public keys: pass trusted_keys=FILE '
            f"(--trusted-keys FILE) or set {KEYS_ENV}=FILE"
        )
    return TrustPolicy("signed", load_trusted_keys(path))


def _read_small(path: Path, limit: int, what: str, private: bool = False) -> bytes:
    """A regular file (not a symlink) of at most `limit` bytes, or ConfigError. A key file must not
    be writable by group or others (they could add their key), a private one not even readable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {str(path)!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise ConfigError(f"the {what} {str(path)!r} is not a regular file of at most {limit} bytes")
        loose = st.st_mode & (0o077 if private else 0o022)
        if os.name == "posix" and loose:
            who = "accessible to" if private else "writable by"
            raise ConfigError(
                f"the {what} {str(path)!r} is {who} group or others (mode {stat.filemode(st.st_mode)}); "
                f"restrict it with `chmod {'600' if private else '644'} {path}`"
            )
        return f.read(limit + 1)[:limit]


def load_trusted_keys(path: str | os.PathLike[str]) -> dict[str, bytes]:
    """Trusted Ed25519 public keys from a file: PEM blocks (`openssl pkey -pubout`) and/or lines of
    base64 raw 32-byte keys; blank lines and `#` comments are skipped. Key id -> raw key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    p = Path(path).expanduser()
    text = _read_small(p, MAX_KEY_FILE_BYTES, "trusted keys file").decode("utf-8", "replace")
    keys: dict[str, bytes] = {}
    pem: list[str] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if pem is not None:
            pem.append(line)
            if line != _PEM_END:
                continue
            try:
                key = serialization.load_pem_public_key("\n".join(pem).encode())
            except ValueError:
                raise ConfigError(f"{p}: the PEM block ending on line {n} is not a public key") from None
            pem = None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"{p}: the PEM block ending on line {n} is not an Ed25519 key")
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        elif not line or line.startswith("#"):
            continue
        elif line == _PEM_BEGIN:
            pem = [line]
            continue
        else:
            try:
                raw = base64.b64decode(line, validate=True)
            except binascii.Error:
                raw = b""
            if len(raw) != 32:
                raise ConfigError(
                    f"{p}, line {n}: not a PEM public key or a base64 raw 32-byte Ed25519 public key"
                )
        keys[key_id(raw)] = raw
    if pem is not None:
        raise ConfigError(f"{p}: a PEM block is not closed by {_PEM_END}")
    if not keys:
        raise ConfigError(f"{p} holds no public keys")
    return keys


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """An unencrypted PEM Ed25519 private key; refused when group or others may access the file."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path).expanduser()
    data = _read_small(p, MAX_KEY_FILE_BYTES, "private key file", private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigError(f"{p} is an encrypted key; mmedge reads unencrypted PEM keys only") from None
    except ValueError:
        raise ConfigError(f"{p} is not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{p} is not an Ed25519 private key (make one with `mmedge keygen`)")
    return key


def generate_keypair(out: str | os.PathLike[str], force: bool = False) -> dict[str, str]:
    """Write a new Ed25519 key pair into `out`: the private key (mode 0600) and the public key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    folder = Path(out).expanduser()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    priv_path, pub_path = folder / PRIVATE_KEY_NAME, folder / PUBLIC_KEY_NAME
    if not force and (priv_path.exists() or pub_path.exists()):
        raise InvalidInputError(f"{folder} already holds a key pair; pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key()
    public_pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    priv_path.unlink(missing_ok=True)
    pub_path.unlink(missing_ok=True)
    # Created 0600 from the start, so the key is never readable by others, even briefly.
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    pub_path.write_bytes(public_pem)
    pub_path.chmod(0o644)  # whatever the umask: a trusted-keys file others can write is refused
    return {"private_key": str(priv_path), "public_key": str(pub_path), "key_id": key_id(raw)}


def read_signature(root: Path) -> tuple[str, bytes] | None:
    """The (key id, signature) of `manifest.sig`, None when there is none; IntegrityError when it is
    not a small regular file holding exactly the signature record."""
    path = root / SIGNATURE_NAME
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_SIGNATURE_BYTES:
        raise IntegrityError(f"{SIGNATURE_NAME} is not a regular file of at most {MAX_SIGNATURE_BYTES} bytes")
    try:
        record: Any = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError):
        raise IntegrityError(f"{SIGNATURE_NAME} is not valid JSON") from None
    if (
        not isinstance(record, dict)
        or set(record) != _SIG_KEYS
        or not all(isinstance(v, str) for v in record.values())
    ):
        raise IntegrityError(f"{SIGNATURE_NAME} must hold exactly the string keys {sorted(_SIG_KEYS)}")
    if record["schema"] != SIGNATURE_SCHEMA or record["algorithm"] != ALGORITHM:
        raise IntegrityError(
            f"{SIGNATURE_NAME}: schema {record['schema']!r} / algorithm {record['algorithm']!r} are not "
            f"{SIGNATURE_SCHEMA!r} / {ALGORITHM!r}"
        )
    try:
        signature = base64.b64decode(record["signature"], validate=True)
    except binascii.Error:
        signature = b""
    if len(signature) != 64:
        raise IntegrityError(f"{SIGNATURE_NAME}: the signature is not a base64 64-byte Ed25519 signature")
    return record["key_id"], signature


def sign_package(root: str | os.PathLike[str], key_path: str | os.PathLike[str]) -> dict[str, str]:
    """Verify a package, then sign its manifest's exact bytes and write `manifest.sig` beside it."""
    from cryptography.hazmat.primitives import serialization

    from mmedge.runtime.manifest import parse_manifest
    from mmedge.runtime.package import verify_package
    from mmedge.runtime.staging import write_atomic

    key = load_private_key(key_path)  # before any work: a bad key is the likeliest mistake
    pkg = verify_package(root)
    raw = (pkg.root / MANIFEST_NAME).read_bytes()
    if parse_manifest(raw) != pkg.manifest:  # the bytes signed are the manifest just verified
        raise IntegrityError(f"{pkg.root / MANIFEST_NAME} changed while it was being signed")
    public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    record = {
        "schema": SIGNATURE_SCHEMA,
        "algorithm": ALGORITHM,
        "key_id": key_id(public),
        "signature": base64.b64encode(key.sign(raw)).decode(),
    }
    write_atomic(pkg.root / SIGNATURE_NAME, json.dumps(record, indent=2) + "\n")
    return {"package": str(pkg.root), "signature": str(pkg.root / SIGNATURE_NAME), "key_id": record["key_id"]}


def drop_signature(root: Path) -> bool:
    """Remove a package's signature (its manifest is about to change); True when there was one."""
    path = root / SIGNATURE_NAME
    if os.path.lexists(path):
        path.unlink()
        return True
    return False


def unsigned_note(root: Path) -> str:
    """What calibrate and build say when their new manifest leaves a signed package unsigned."""
    return (
        f"note: {root} was signed; its manifest changes, so the signature was removed and the package "
        f"is unsigned until re-signed with `mmedge sign {root} --key KEYFILE`"
    )
