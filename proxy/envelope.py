"""Envelope encryption: every object gets its own AES-256-CTR data key and IV, wrapped by an RSA master key
and stored with the object as metadata, in the format Alibaba's oss2 `CryptoBucket` writes and reads
(docs/oss.md, "Client-side (envelope) encryption"). The engine knows no provider's requests: it makes and
reads the metadata, streams the cipher, and plans range reads. It also reads the Azure Media Services
storage-encryption counter layout (docs/aes-ctr-layouts.md).

Nothing here logs, and no exception message carries key material or a wrapped key.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

DATA_KEY_BYTES = 32
IV_BYTES = 16
BLOCK_BYTES = 16
MAX_MASTER_KEYS = 16  # a read may try every one of them, two RSA decryptions apiece
_COUNTER_MODULUS = 1 << 128

# oss2 headers.py: OSS_CLIENT_SIDE_ENCRYPTION_*
METADATA_PREFIX = "x-oss-meta-client-side-encryption-"
KEY_HEADER = METADATA_PREFIX + "key"
START_HEADER = METADATA_PREFIX + "start"
CEK_ALG_HEADER = METADATA_PREFIX + "cek-alg"
WRAP_ALG_HEADER = METADATA_PREFIX + "wrap-alg"
MATDESC_HEADER = METADATA_PREFIX + "matdesc"
UNENCRYPTED_LENGTH_HEADER = METADATA_PREFIX + "unencrypted-content-length"
UNENCRYPTED_MD5_HEADER = METADATA_PREFIX + "unencrypted-content-md5"
DATA_SIZE_HEADER = METADATA_PREFIX + "data-size"
PART_SIZE_HEADER = METADATA_PREFIX + "part-size"
DEPRECATED_KEY_HEADER = "x-oss-meta-oss-crypto-key"  # oss2's first format, IV stored as a decimal counter
CEK_ALGORITHM = "AES/CTR/NoPadding"


class Wrap(StrEnum):
    """How the master key wraps the data key and the IV."""

    PKCS1V15 = "pkcs1v15"  # oss2 RsaProvider, and the Java and Go SDKs
    OAEP_SHA1 = "oaep-sha1"  # oss2 LocalRsaProvider


WRAP_ALGORITHMS = {Wrap.PKCS1V15: "RSA/NONE/PKCS1Padding", Wrap.OAEP_SHA1: "RSA/NONE/OAEPWithSHA-1AndMGF1Padding"}
_WRAP_BY_ALGORITHM = {name: wrap for wrap, name in WRAP_ALGORITHMS.items()}
_PADDINGS = {Wrap.PKCS1V15: padding.PKCS1v15(),
             Wrap.OAEP_SHA1: padding.OAEP(padding.MGF1(hashes.SHA1()), hashes.SHA1(), None)}


class EnvelopeError(ValueError):
    """The object's data key cannot be had. Messages name headers, algorithms and master key names only."""


class MissingEnvelope(EnvelopeError):
    """The object carries no client-side encryption metadata."""


class MalformedEnvelope(EnvelopeError):
    """The metadata is incomplete or not what the format allows: damaged or tampered."""


class UnsupportedEnvelope(EnvelopeError):
    """Another algorithm, or an older format, than keycourier reads."""


class WrongKey(EnvelopeError):
    """None of the keys at hand opens this object."""


class RangeNotSatisfiable(ValueError):
    """The range starts at or past the end of the object (HTTP 416)."""


@dataclass(frozen=True, eq=False)
class MasterKey:
    """An RSA key pair: the public half wraps new data keys, the private half unwraps stored ones.
    `matdesc` is oss2's material description, stored with each object to say which master key wrapped it."""

    name: str
    private_key: rsa.RSAPrivateKey = field(repr=False)
    wrap: Wrap = Wrap.PKCS1V15
    matdesc: Mapping[str, str] | None = None

    @classmethod
    def from_pem(cls, name: str, pem: bytes, *, wrap: Wrap = Wrap.PKCS1V15,
                 matdesc: Mapping[str, str] | None = None, password: bytes | None = None) -> MasterKey:
        try:
            key = serialization.load_pem_private_key(pem, password)
        except (ValueError, TypeError):
            raise ValueError(f"master key {name!r} is not a PEM private key, or its password is wrong") from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError(f"master key {name!r} is not an RSA key")
        return cls(name, key, Wrap(wrap), dict(matdesc) if matdesc else None)

    @property
    def wrapped_length(self) -> int:
        """Every RSA ciphertext is as long as the modulus."""
        return (self.private_key.key_size + 7) // 8

    def wrap_secret(self, secret: bytes) -> bytes:
        return self.private_key.public_key().encrypt(secret, _PADDINGS[self.wrap])

    def unwrap_secret(self, wrapped: bytes, wrap: Wrap) -> bytes | None:
        """The secret, or None when the padding does not check out. PKCS#1 v1.5 decryption never fails with
        a wrong key (OpenSSL's implicit rejection returns random bytes instead): callers check the length."""
        try:
            return self.private_key.decrypt(wrapped, _PADDINGS[wrap])
        except ValueError:
            return None


@dataclass(frozen=True)
class ContentMaterial:
    """One object's data key and IV, and their wrapped forms as its metadata stores them."""

    data_key: bytes = field(repr=False)
    iv: bytes = field(repr=False)
    wrapped_key: bytes = field(repr=False)
    wrapped_iv: bytes = field(repr=False)
    wrap: Wrap
    matdesc: Mapping[str, str] | None
    master_key_name: str

    def cipher(self, offset: int = 0, discard: int = 0) -> AesCtrStream:
        """The object's cipher from byte `offset` on (oss2's layout: the IV is the first counter block)."""
        return AesCtrStream(self.data_key, int.from_bytes(self.iv, "big"), offset, discard)


class AesCtrStream:
    """AES-256-CTR from byte `offset` of a stream on, one chunk at a time in constant memory; encrypting and
    decrypting are the same. Usable as a mitmproxy stream transform: called per chunk, then once with b"".
    Block n of the stream uses counter block `first_counter + n` (128-bit, big-endian, wrapping).
    The first `discard` output bytes are dropped (a range read that starts before the client's range)."""

    def __init__(self, key: bytes, first_counter: int, offset: int = 0, discard: int = 0):
        if len(key) != DATA_KEY_BYTES:
            raise ValueError(f"AES-256 takes a {DATA_KEY_BYTES}-byte key")
        if offset < 0 or discard < 0:
            raise ValueError("offset and discard cannot be negative")
        block, skip = divmod(offset, BLOCK_BYTES)
        counter = ((first_counter + block) % _COUNTER_MODULUS).to_bytes(BLOCK_BYTES, "big")
        self._keystream = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
        self._keystream.update(bytes(skip))  # the part of the first block that lies before `offset`
        self._discard = discard

    def __call__(self, chunk: bytes) -> bytes:
        out = self._keystream.update(chunk)
        if self._discard:
            dropped = min(self._discard, len(out))
            self._discard -= dropped
            out = out[dropped:]
        return out


# --- the oss2 CryptoBucket format ------------------------------------------------------------------

def new_material(master: MasterKey) -> ContentMaterial:
    """A fresh data key and IV for one object, wrapped by `master`."""
    data_key = os.urandom(DATA_KEY_BYTES)
    random = os.urandom(IV_BYTES)
    # Bytes 8-11 zero, as oss2's utils.random_iv makes them: the low half of the counter starts below 2**32,
    # so it never carries into the random high half.
    iv = random[:8] + bytes(4) + random[12:]
    return ContentMaterial(data_key, iv, master.wrap_secret(data_key), master.wrap_secret(iv), master.wrap,
                           master.matdesc, master.name)


def render_metadata(material: ContentMaterial, plaintext_length: int | None = None,
                    content_md5: str | None = None, *, data_size: int | None = None,
                    part_size: int | None = None) -> dict[str, str]:
    """The object metadata headers for `material`, as oss2's ContentCryptoMaterial.to_object_meta writes them.
    `content_md5` is the client's Content-MD5 of the plaintext. `data_size` and `part_size` announce a
    multipart upload's total size and part size at InitiateMultipartUpload."""
    headers = {KEY_HEADER: base64.b64encode(material.wrapped_key).decode(),
               START_HEADER: base64.b64encode(material.wrapped_iv).decode(),
               CEK_ALG_HEADER: CEK_ALGORITHM,
               WRAP_ALG_HEADER: WRAP_ALGORITHMS[material.wrap]}
    if plaintext_length is not None:
        headers[UNENCRYPTED_LENGTH_HEADER] = str(plaintext_length)
    if content_md5 is not None:
        headers[UNENCRYPTED_MD5_HEADER] = content_md5
    if (data_size is None) != (part_size is None):
        raise ValueError("a multipart upload announces both its data size and its part size")
    if part_size is not None:
        if part_size <= 0 or part_size % BLOCK_BYTES:
            raise ValueError(f"the part size must be a positive multiple of {BLOCK_BYTES}")
        headers[DATA_SIZE_HEADER] = str(data_size)
        headers[PART_SIZE_HEADER] = str(part_size)
    if material.matdesc:
        headers[MATDESC_HEADER] = json.dumps(material.matdesc)  # json.dumps' default separators, as oss2
    return headers


def parse_metadata(headers: Mapping[str, str], master_keys: Sequence[MasterKey]) -> ContentMaterial:
    """The material of an object from its response headers. Master keys whose material description is the
    object's are tried in order; raises an EnvelopeError rather than return a key that may be wrong."""
    if not 0 < len(master_keys) <= MAX_MASTER_KEYS:
        raise ValueError(f"give between 1 and {MAX_MASTER_KEYS} master keys")
    fields = {name.lower(): value for name, value in headers.items()}
    if not any(name.startswith(METADATA_PREFIX) for name in fields):
        if DEPRECATED_KEY_HEADER in fields:
            raise UnsupportedEnvelope("the object is in oss2's first client-side format (x-oss-meta-oss-crypto-*), "
                                      "which keycourier does not read")
        raise MissingEnvelope("the object has no client-side encryption metadata")
    missing = [name for name in (KEY_HEADER, START_HEADER, CEK_ALG_HEADER, WRAP_ALG_HEADER) if name not in fields]
    if missing:
        raise MalformedEnvelope(f"the client-side encryption metadata lacks {', '.join(missing)}")
    if fields[CEK_ALG_HEADER] != CEK_ALGORITHM:
        raise UnsupportedEnvelope(f"the data is encrypted with {_shown(fields[CEK_ALG_HEADER])}; "
                                  f"keycourier reads {CEK_ALGORITHM}")
    wrap = _WRAP_BY_ALGORITHM.get(fields[WRAP_ALG_HEADER])
    if wrap is None:
        raise UnsupportedEnvelope(f"the data key is wrapped with {_shown(fields[WRAP_ALG_HEADER])}; "
                                  f"keycourier reads {' and '.join(WRAP_ALGORITHMS.values())}")
    wrapped_key, wrapped_iv = _base64_field(fields, KEY_HEADER), _base64_field(fields, START_HEADER)
    matdesc = _parse_matdesc(fields.get(MATDESC_HEADER))
    # As oss2 does, the material description picks the master key.
    candidates = [key for key in master_keys if (key.matdesc or None) == matdesc]
    if not candidates:
        raise WrongKey("no master key has the object's material description")
    fitting = [key for key in candidates if len(wrapped_key) == len(wrapped_iv) == key.wrapped_length]
    if not fitting:
        raise MalformedEnvelope("the wrapped data key or IV is not as long as any master key's modulus: "
                                "damaged or tampered metadata")
    for master in fitting:
        # Both are unwrapped whatever the first gives: a failure takes as long whichever of them failed, so the
        # time of an answer tells nothing of which padding checked out (no Bleichenbacher oracle).
        data_key, iv = master.unwrap_secret(wrapped_key, wrap), master.unwrap_secret(wrapped_iv, wrap)
        if data_key is not None and iv is not None and (len(data_key), len(iv)) == (DATA_KEY_BYTES, IV_BYTES):
            return ContentMaterial(data_key, iv, wrapped_key, wrapped_iv, wrap, matdesc, master.name)
    names = ", ".join(repr(key.name) for key in fitting)
    raise WrongKey(f"no master key ({names}) unwraps the object's data key and IV: another master key "
                   "wrapped them, or the metadata was tampered with")


def _shown(value: str) -> str:
    return repr(value[:64])  # an algorithm name from the object's metadata: not secret, but not trusted either


def _base64_field(fields: Mapping[str, str], name: str) -> bytes:
    try:
        return base64.b64decode(fields[name], validate=True)
    except (binascii.Error, ValueError):
        raise MalformedEnvelope(f"{name} is not valid base64") from None


def _parse_matdesc(text: str | None) -> dict | None:
    if text is None:
        return None
    try:
        matdesc = json.loads(text)
    except ValueError:
        raise MalformedEnvelope(f"{MATDESC_HEADER} is not JSON") from None
    if not isinstance(matdesc, dict):
        raise MalformedEnvelope(f"{MATDESC_HEADER} is not a JSON object")
    return matdesc or None


# --- range reads -----------------------------------------------------------------------------------

_BYTE_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


@dataclass(frozen=True)
class RangePlan:
    """A client's byte range `first`-`last` of an object of `size` bytes, and the range to ask the provider
    for instead: from the start of the AES block holding `first`, so decryption starts on a block boundary,
    and `trim_start` decrypted bytes are dropped. Ciphertext is as long as plaintext and CTR needs no whole
    last block, so the end stays where the client put it."""

    first: int
    last: int
    size: int

    @property
    def upstream_first(self) -> int:
        return self.first - self.trim_start

    @property
    def trim_start(self) -> int:
        return self.first % BLOCK_BYTES

    @property
    def upstream_range(self) -> str:
        return f"bytes={self.upstream_first}-{self.last}"

    @property
    def content_range(self) -> str:
        return f"bytes {self.first}-{self.last}/{self.size}"

    @property
    def content_length(self) -> int:
        return self.last - self.first + 1

    def decryptor(self, material: ContentMaterial) -> AesCtrStream:
        """Decrypts the provider's answer to `upstream_range` into exactly the client's range."""
        return material.cipher(self.upstream_first, self.trim_start)


def plan_range(header: str | None, size: int, *, ignore_out_of_range: bool = False) -> RangePlan | None:
    """The plan for a `Range` header on an object of `size` bytes, or None when the whole object is served
    (no header, or one that is not a single byte range). As RFC 9110 says: the end is clipped to the
    object, a suffix longer than the object means all of it, and a start at or past the end (or an empty
    suffix) raises RangeNotSatisfiable. With `ignore_out_of_range`, as OSS answers by default
    (docs/oss.md), a range that reaches outside the object serves it whole instead."""
    match = _BYTE_RANGE.fullmatch(header.strip()) if header is not None else None
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first_text, last_text = match.groups()
    if first_text:
        first = int(first_text)
        if last_text and int(last_text) < first:
            return None  # not a valid range: ignored
        last = int(last_text) if last_text else size - 1
        reaches_out = first >= size or last >= size
    else:
        suffix = int(last_text)
        first, last = max(size - suffix, 0), size - 1
        reaches_out = suffix > size or suffix == 0
    if reaches_out and ignore_out_of_range:
        return None
    if first >= size or first > last:
        raise RangeNotSatisfiable(f"{header} cannot be satisfied by an object of {size} bytes")
    return RangePlan(first, min(last, size - 1), size)


# --- Azure Media Services storage encryption -------------------------------------------------------

_AZURE_KEY_ID_PREFIX = "nb:kid:UUID:"
_AZURE_MAX_OFFSET = BLOCK_BYTES << 64  # files are shorter than 2**64 blocks, so the block index never wraps


def azure_media_stream(content_key: bytes, iv: int, offset: int = 0, discard: int = 0) -> AesCtrStream:
    """Azure Media Services storage encryption of one file: the counter block is the file's 64-bit IV
    followed by the 64-bit block index, both big-endian. `iv` is the AssetFile's InitializationVector."""
    if not 0 <= iv < 1 << 64:
        raise ValueError("the InitializationVector is a 64-bit unsigned integer")
    if offset >= _AZURE_MAX_OFFSET:
        raise ValueError("Azure Media Services files are shorter than 2**64 blocks")
    return AesCtrStream(content_key, iv << 64, offset, discard)


def azure_media_key_id(text: str) -> uuid.UUID:
    """The GUID of a ContentKey Id such as 'nb:kid:UUID:9c8ea9c6-52bd-4232-8a43-8e43d8564a99'."""
    return uuid.UUID(text.removeprefix(_AZURE_KEY_ID_PREFIX))


def azure_media_key_checksum(content_key: bytes, key_id: uuid.UUID) -> str:
    """Base64 of the first 8 bytes of AES-ECB under the content key of the key id's GUID, laid out as .NET's
    Guid.ToByteArray lays it out (the first three fields little-endian)."""
    encryptor = Cipher(algorithms.AES(content_key), modes.ECB()).encryptor()
    block = encryptor.update(key_id.bytes_le) + encryptor.finalize()
    return base64.b64encode(block[:8]).decode()


def check_azure_media_key(content_key: bytes, key_id: uuid.UUID, checksum: str) -> None:
    """Raises WrongKey unless `content_key` is the key the ContentKey's checksum was made with."""
    if not hmac.compare_digest(azure_media_key_checksum(content_key, key_id), checksum):
        raise WrongKey(f"the content key does not match the checksum of key {key_id}")
