"""Signed packages: Ed25519 over manifest.json, and the trust policy that refuses what is not signed.

Hostile packages are made here the way an attacker would: edit a file, re-hash the manifest (which
anyone can do), and either leave the old signature, sign with their own key, or claim a trusted
key's id. Under trust="signed" every one is an IntegrityError; under the default policy an unsigned
package keeps working. Every case runs under a faulthandler watchdog.
"""

from __future__ import annotations

import base64
import faulthandler
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mmedge.errors import ConfigError, IntegrityError, InvalidInputError, MmedgeError

CASE_TIMEOUT_S = 120


@pytest.fixture(autouse=True)
def _watchdog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A hang dumps every thread's stack and ends the run instead of stalling it; no stray policy."""
    monkeypatch.delenv("MMEDGE_TRUST", raising=False)
    monkeypatch.delenv("MMEDGE_TRUSTED_KEYS", raising=False)
    faulthandler.dump_traceback_later(CASE_TIMEOUT_S, exit=True, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two key pairs: `mine` (trusted) and `theirs` (an attacker's)."""
    from mmedge.runtime.signing import generate_keypair

    out = {}
    for who in ("mine", "theirs"):
        made = generate_keypair(tmp_path_factory.mktemp(who))
        out[f"{who}_key"], out[f"{who}_pub"] = Path(made["private_key"]), Path(made["public_key"])
    return out


def _open(root: Path, trust: str | None = None, trusted_keys: Path | None = None) -> object:
    from mmedge import sdk

    return sdk.Pipeline(str(root), trust=trust, trusted_keys=trusted_keys, preload=True)


def _signed(root: Path, key: Path) -> Path:
    from mmedge.runtime.signing import sign_package

    sign_package(root, key)
    return root


def _relist(root: Path, *rels: str) -> None:
    """Re-hash files into the manifest, as anyone (but not the key holder's signature) can."""
    from mmedge.runtime.package import sha256_file

    raw = json.loads((root / "manifest.json").read_text())
    for rel in rels:
        raw["files"][rel] = {"sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
    (root / "manifest.json").write_text(json.dumps(raw))


def _flip(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def _sig(root: Path) -> dict:
    return json.loads((root / "manifest.sig").read_text())


def _write_sig(root: Path, **changes: object) -> None:
    (root / "manifest.sig").write_text(json.dumps({**_sig(root), **changes}))


# --- the signed path works ---------------------------------------------------------------------


def test_sign_then_open_with_the_trusted_key(tiny_pkg: Path, keys: dict[str, Path]) -> None:
    from mmedge.runtime.package import verify_package
    from mmedge.runtime.signing import trust_policy

    _signed(tiny_pkg, keys["mine_key"])
    assert (tiny_pkg / "manifest.sig").is_file()
    policy = trust_policy("signed", keys["mine_pub"])
    assert policy.check(tiny_pkg, (tiny_pkg / "manifest.json").read_bytes()) in policy.keys
    pipe = _open(tiny_pkg, "signed", keys["mine_pub"])
    assert pipe.embed_texts(["a red circle"]).shape[0] == 1  # type: ignore[attr-defined]
    # the signature is not listed in the manifest, and the default verification ignores it
    pkg = verify_package(tiny_pkg)
    assert "manifest.sig" not in pkg.manifest.files


def test_trusted_keys_file_takes_pem_and_raw_base64_keys(tmp_path: Path, keys: dict[str, Path]) -> None:
    from cryptography.hazmat.primitives import serialization

    from mmedge.runtime.signing import key_id, load_trusted_keys

    theirs = serialization.load_pem_public_key(keys["theirs_pub"].read_bytes())
    raw = theirs.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    f = tmp_path / "trusted"
    f.write_text(f"# team keys\n{keys['mine_pub'].read_text()}\n{base64.b64encode(raw).decode()}\n")
    loaded = load_trusted_keys(f)
    assert len(loaded) == 2 and loaded[key_id(raw)] == raw


def test_unsigned_package_works_by_default_and_is_refused_when_signed_is_required(
    tiny_pkg: Path, keys: dict[str, Path]
) -> None:
    _open(tiny_pkg)
    _open(tiny_pkg, "hashes")
    with pytest.raises(IntegrityError, match=r"is not signed \(no manifest\.sig\)"):
        _open(tiny_pkg, "signed", keys["mine_pub"])
    # keys given without a mode mean "check them"
    with pytest.raises(IntegrityError, match="is not signed"):
        _open(tiny_pkg, trusted_keys=keys["mine_pub"])


def test_environment_sets_the_policy(
    tiny_pkg: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMEDGE_TRUST", "signed")
    monkeypatch.setenv("MMEDGE_TRUSTED_KEYS", str(keys["mine_pub"]))
    with pytest.raises(IntegrityError, match="is not signed"):
        _open(tiny_pkg)
    _open(_signed(tiny_pkg, keys["mine_key"]))
    monkeypatch.setenv("MMEDGE_TRUSTED_KEYS", str(keys["theirs_pub"]))
    with pytest.raises(IntegrityError, match="not a trusted key"):
        _open(tiny_pkg)
    _open(tiny_pkg, trust="hashes")  # the caller's explicit choice wins over the environment
    monkeypatch.setenv("MMEDGE_TRUST", "hashes")
    with pytest.raises(IntegrityError, match="not a trusted key"):  # keys passed in mean "signed"
        _open(tiny_pkg, trusted_keys=keys["theirs_pub"])


# --- hostile packages under trust="signed" -----------------------------------------------------


def test_refused_with_another_key(tiny_pkg: Path, keys: dict[str, Path]) -> None:
    _signed(tiny_pkg, keys["mine_key"])
    with pytest.raises(
        IntegrityError, match=r"signed by key ed25519:[0-9a-f]{32}, which is not a trusted key"
    ):
        _open(tiny_pkg, "signed", keys["theirs_pub"])


def test_any_changed_byte_of_any_file_is_refused(
    tmp_path: Path, tiny_pkg_session: Path, keys: dict[str, Path]
) -> None:
    """Every file of the package, one byte flipped: re-hashed into the manifest (the signature no
    longer matches) or not (the hash no longer matches). The manifest and signature too. Opened and
    loaded as a device does; the reports, which no runtime reads, by full verification."""
    from mmedge.runtime.package import read_manifest, verify_package
    from mmedge.runtime.signing import trust_policy

    signed = _signed(shutil.copytree(tiny_pkg_session, tmp_path / "signed"), keys["mine_key"])
    files = sorted(read_manifest(signed).files)
    assert len(files) >= 4 and any(f.endswith(".onnx") for f in files)
    rows = 0
    for rel in [*files, "manifest.json", "manifest.sig"]:
        for rehash in (True, False):
            if rehash and rel in ("manifest.json", "manifest.sig"):
                continue
            root = shutil.copytree(signed, tmp_path / f"case{rows}")
            # in the signature file, a byte of the base64 signature itself; in the manifest, a digit of
            # its creation time (still a valid manifest: the signature is what must refuse it)
            at = None
            if rel == "manifest.sig":
                at = (root / rel).read_bytes().rindex(b'"') - 5
            elif rel == "manifest.json":
                at = (root / rel).read_bytes().index(b'"created"') + 14
            _flip(root / rel, at)
            if rehash:
                _relist(root, rel)
            with pytest.raises(IntegrityError) as info:
                if rel.startswith("reports/") and not rehash:
                    # no runtime reads the reports: opening never hashes them; full verification does
                    verify_package(root, trust=trust_policy("signed", keys["mine_pub"]))
                else:
                    _open(root, "signed", keys["mine_pub"])
            if rel == "manifest.sig":
                expected = "manifest.sig"
            elif rehash or rel == "manifest.json":
                expected = "does not match manifest.json"  # the signature no longer fits
            else:
                expected = "sha256 differs"  # the signed manifest still holds the old hash
            assert expected in str(info.value), (rel, rehash, info.value)
            shutil.rmtree(root)
            rows += 1
    assert rows == 2 * len(files) + 2


def test_manifest_resigned_with_an_untrusted_key_is_refused(tiny_pkg: Path, keys: dict[str, Path]) -> None:
    _signed(tiny_pkg, keys["mine_key"])
    tok = tiny_pkg / "tokenizer.json"
    tok.write_bytes(tok.read_bytes() + b" ")  # still a valid tokenizer, so the attacker can sign it
    _relist(tiny_pkg, "tokenizer.json")
    _signed(tiny_pkg, keys["theirs_key"])  # the attacker's own key signs the re-hashed manifest
    with pytest.raises(IntegrityError, match="not a trusted key"):
        _open(tiny_pkg, "signed", keys["mine_pub"])
    # and claiming the trusted key's id does not help: the signature does not verify under it
    from mmedge.runtime.signing import trust_policy

    (trusted_id,) = trust_policy("signed", keys["mine_pub"]).keys
    _write_sig(tiny_pkg, key_id=trusted_id)
    with pytest.raises(IntegrityError, match=r"does not match manifest\.json"):
        _open(tiny_pkg, "signed", keys["mine_pub"])


def test_a_signature_copied_from_another_package_is_refused(
    tiny_pkg: Path, tmp_path: Path, keys: dict[str, Path]
) -> None:
    other = shutil.copytree(tiny_pkg, tmp_path / "other")
    raw = json.loads((other / "manifest.json").read_text())
    raw["name"] = "other"
    (other / "manifest.json").write_text(json.dumps(raw))
    _signed(other, keys["mine_key"])
    shutil.copy(other / "manifest.sig", tiny_pkg / "manifest.sig")
    with pytest.raises(IntegrityError, match=r"does not match manifest\.json"):
        _open(tiny_pkg, "signed", keys["mine_pub"])


def test_an_added_build_is_refused(tiny_pkg: Path, keys: dict[str, Path]) -> None:
    """A build (or TensorRT engine) slipped in and listed by the attacker changes the manifest."""
    _signed(tiny_pkg, keys["mine_key"])
    (tiny_pkg / "engines").mkdir()
    shutil.copy(tiny_pkg / "onnx" / "vision.onnx", tiny_pkg / "engines" / "vision.fp32.onnx")
    _relist(tiny_pkg, "engines/vision.fp32.onnx")
    with pytest.raises(IntegrityError, match=r"does not match manifest\.json"):
        _open(tiny_pkg, "signed", keys["mine_pub"])


def _symlinked(root: Path) -> None:
    target = root.parent / "elsewhere.sig"
    shutil.move(root / "manifest.sig", target)
    os.symlink(target, root / "manifest.sig")


def _directory(root: Path) -> None:
    (root / "manifest.sig").unlink()
    (root / "manifest.sig").mkdir()


BAD_SIGNATURES: list[tuple[str, Callable[[Path], object], str]] = [
    ("symlink", _symlinked, "not a regular file"),
    ("directory", _directory, "not a regular file"),
    ("oversize", lambda r: (r / "manifest.sig").write_text(" " * 5000), "not a regular file of at most 4096"),
    ("not-json", lambda r: (r / "manifest.sig").write_bytes(b"\xff\x00sig"), "not valid JSON"),
    ("json-list", lambda r: (r / "manifest.sig").write_text("[]"), "must hold exactly the string keys"),
    ("extra-key", lambda r: _write_sig(r, note="x"), "must hold exactly the string keys"),
    ("int-value", lambda r: _write_sig(r, key_id=7), "must hold exactly the string keys"),
    ("algorithm", lambda r: _write_sig(r, algorithm="rsa"), "algorithm 'rsa'"),
    ("schema", lambda r: _write_sig(r, schema="mmedge.signature/9"), "schema 'mmedge.signature/9'"),
    ("bad-base64", lambda r: _write_sig(r, signature="***"), "not a base64 64-byte"),
    (
        "short",
        lambda r: _write_sig(r, signature=base64.b64encode(b"x" * 63).decode()),
        "not a base64 64-byte",
    ),
    ("zeros", lambda r: _write_sig(r, signature=base64.b64encode(bytes(64)).decode()), "does not match"),
]


@pytest.mark.parametrize(
    ("tamper", "match"), [(t, m) for _, t, m in BAD_SIGNATURES], ids=[i for i, _, _ in BAD_SIGNATURES]
)
def test_bad_signature_file(
    tiny_pkg: Path, keys: dict[str, Path], tamper: Callable[[Path], object], match: str
) -> None:
    _signed(tiny_pkg, keys["mine_key"])
    tamper(tiny_pkg)
    with pytest.raises(IntegrityError, match=match):
        _open(tiny_pkg, "signed", keys["mine_pub"])
    _open(tiny_pkg)  # the default policy does not read the signature at all


# --- keys and settings -------------------------------------------------------------------------


def test_private_key_readable_by_others_is_refused(
    tiny_pkg: Path, keys: dict[str, Path], tmp_path: Path
) -> None:
    from mmedge.runtime.signing import sign_package

    loose = tmp_path / "loose.key"
    shutil.copy(keys["mine_key"], loose)
    loose.chmod(0o644)
    with pytest.raises(ConfigError, match=r"accessible to group or others .*chmod 600"):
        sign_package(tiny_pkg, loose)
    assert not (tiny_pkg / "manifest.sig").exists()


def _ec_public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


BAD_SETTINGS: list[tuple[str, dict[str, str], Callable[[Path], dict], type[MmedgeError], str]] = [
    ("trust-bogus", {}, lambda k: {"trust": "anything"}, InvalidInputError, "trust must be one of"),
    ("env-bogus", {"MMEDGE_TRUST": "yes"}, lambda k: {}, ConfigError, "MMEDGE_TRUST='yes'"),
    ("signed-no-keys", {}, lambda k: {"trust": "signed"}, ConfigError, "needs a file of trusted public keys"),
    ("env-signed-no-keys", {"MMEDGE_TRUST": "signed"}, lambda k: {}, ConfigError, "MMEDGE_TRUSTED_KEYS"),
    (
        "keys-missing",
        {},
        lambda k: {"trusted_keys": k / "absent"},
        ConfigError,
        "cannot read the trusted keys",
    ),
    (
        "keys-garbage",
        {},
        lambda k: {"trusted_keys": _w(k / "g", b"hello\n")},
        ConfigError,
        "line 1: not a PEM",
    ),
    (
        "keys-empty",
        {},
        lambda k: {"trusted_keys": _w(k / "e", b"# none\n")},
        ConfigError,
        "holds no public keys",
    ),
    (
        "keys-ec",
        {},
        lambda k: {"trusted_keys": _w(k / "ec", _ec_public_pem())},
        ConfigError,
        "not an Ed25519 key",
    ),
    (
        "keys-writable",
        {},
        lambda k: {"trusted_keys": _w(k / "w", b"", 0o666)},
        ConfigError,
        "writable by group",
    ),
    (
        "keys-open-pem",
        {},
        lambda k: {"trusted_keys": _w(k / "o", b"-----BEGIN PUBLIC KEY-----\nAAAA\n")},
        ConfigError,
        "not closed",
    ),
]


def _w(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    ("env", "kwargs", "error", "match"),
    [(e, k, c, m) for _, e, k, c, m in BAD_SETTINGS],
    ids=[i for i, *_ in BAD_SETTINGS],
)
def test_bad_trust_setting(
    tiny_pkg: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    kwargs: Callable[[Path], dict],
    error: type[MmedgeError],
    match: str,
) -> None:
    from mmedge import sdk

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(error, match=match) as info:
        sdk.Pipeline(str(tiny_pkg), **kwargs(tmp_path))
    assert type(info.value) is error


# --- command line and writers ------------------------------------------------------------------


def test_cli_keygen_sign_verify_round_trip(
    tiny_pkg: Path, tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    from mmedge.sdk.cli import main

    umask = os.umask(0o002)  # a group-writable default must not leak into the key files
    try:
        assert main(["keygen", "--out", str(tmp_path / "k"), "--json"]) == 0
    finally:
        os.umask(umask)
    made = json.loads(capsys.readouterr().out)
    assert (os.stat(made["private_key"]).st_mode & 0o777) == 0o600
    assert (os.stat(made["public_key"]).st_mode & 0o777) == 0o644
    assert main(["keygen", "--out", str(tmp_path / "k")]) == 1  # never overwrites a key silently
    assert "already holds a key pair" in capsys.readouterr().err

    assert main(["sign", str(tiny_pkg), "--key", made["private_key"], "--json"]) == 0
    signed = json.loads(capsys.readouterr().out)
    assert signed["key_id"] == made["key_id"]

    assert main(["verify", str(tiny_pkg), "--trusted-keys", made["public_key"], "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["trust"] == "signed" and out["signed_by"] == made["key_id"]

    assert main(["verify", str(tiny_pkg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["signature"] == "manifest.sig present, not checked"

    assert main(["verify", str(tiny_pkg), "--trusted-keys", str(keys["theirs_pub"]), "--json"]) == 1
    err = json.loads(capsys.readouterr().out)
    assert err["type"] == "IntegrityError" and "not a trusted key" in err["error"]


def test_calibrate_drops_the_signature(
    tiny_pkg: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    from mmedge.calibration.package import calibrate_package

    _signed(tiny_pkg, keys["mine_key"])
    said: list[str] = []
    report = calibrate_package(tiny_pkg, "train-shapes:8", samples=4, build=None, progress=said.append)
    assert report["signature_removed"] is True
    assert any("the signature was removed" in s and "mmedge sign" in s for s in said)
    assert not (tiny_pkg / "manifest.sig").exists()
    with pytest.raises(IntegrityError, match="is not signed"):
        _open(tiny_pkg, "signed", keys["mine_pub"])
    _open(tiny_pkg)
    _open(_signed(tiny_pkg, keys["mine_key"]), "signed", keys["mine_pub"])  # signed again, accepted


def test_build_drops_the_signature(tiny_pkg: Path, keys: dict[str, Path]) -> None:
    from mmedge.builds.package import build_package
    from mmedge.runtime.package import read_manifest

    _signed(tiny_pkg, keys["mine_key"])
    said: list[str] = []
    out = build_package(tiny_pkg, backend="ort", progress=said.append)
    assert out["signature_removed"] is True and any("signature was removed" in s for s in said)
    assert not (tiny_pkg / "manifest.sig").exists()
    assert "manifest.sig" not in read_manifest(tiny_pkg).files
    with pytest.raises(IntegrityError, match="is not signed"):
        _open(tiny_pkg, "signed", keys["mine_pub"])
    _open(_signed(tiny_pkg, keys["mine_key"]), "signed", keys["mine_pub"])
