"""The envelope-encryption engine against Alibaba's own oss2 SDK: objects the engine encrypts are read by
oss2's CryptoBucket, and objects CryptoBucket writes are read by the engine, whole and by range, through
the OSS test upstream (127.0.0.1, no proxy). Published test vectors pin the AES-CTR counter layouts
(docs/aes-ctr-layouts.md).

`ca` and `ca_pem` come from tests/conftest.py.
"""
import base64
import functools
import os
import uuid
from dataclasses import replace

import oss2
import pytest
from Crypto.Cipher import AES  # pycryptodome (oss2 needs it): AES implemented apart from `cryptography`
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keycourier import envelope
from keycourier.envelope import (MalformedEnvelope, MasterKey, MissingEnvelope, RangeNotSatisfiable, RangePlan,
                                 UnsupportedEnvelope, Wrap, WrongKey)
from tests.digests import md5_b64
from tests.test_upstream_oss import ACCESS_KEY, SECRET_KEY, session
from tests.upstreams.oss import OssUpstream

PLAINTEXT = os.urandom(4099)  # 256 blocks and 3 bytes: the last block is partial
MATDESC = {"desc-key": "desc-value"}  # the seed's Java example (oss-client-side-encryption.txt)
SDK_RANGES = [(0, 0), (5, 40), (4000, None), (4090, 4098)]  # CryptoBucket takes no suffix range
RANGES = ["bytes=0-0", "bytes=5-40", "bytes=4000-", "bytes=-7", "bytes=-4099"]


@functools.cache
def rsa_provider(private_pem: bytes, public_pem: bytes, described: bool = False) -> oss2.RsaProvider:
    """oss2's RsaProvider for a key pair, with MATDESC if `described` (cached: oss2 takes a while to import a key)."""
    return oss2.RsaProvider({"private_key": private_pem, "public_key": public_pem},
                            mat_desc=MATDESC if described else None)


@pytest.fixture(scope="session")
def key_pairs() -> list[tuple[bytes, bytes]]:
    """Two RSA key pairs: (private key PEM, public key PEM)."""
    pairs = []
    for _ in range(2):
        key = rsa.generate_private_key(65537, 2048)
        pairs.append((key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()),
                      key.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)))
    return pairs


@pytest.fixture(params=list(Wrap), ids=str)
def wrap(request) -> Wrap:
    return request.param


@pytest.fixture(scope="session")
def providers(key_pairs, tmp_path_factory) -> dict[Wrap, oss2.crypto.BaseCryptoProvider]:
    """oss2's providers for the first key pair: RsaProvider wraps with PKCS#1 v1.5, LocalRsaProvider with OAEP."""
    directory = tmp_path_factory.mktemp("oss2-keys")
    private_pem, public_pem = key_pairs[0]
    (directory / "master.private_key.pem").write_bytes(private_pem)
    (directory / "master.public_key.pem").write_bytes(public_pem)
    return {Wrap.PKCS1V15: rsa_provider(private_pem, public_pem),
            Wrap.OAEP_SHA1: oss2.LocalRsaProvider(dir=str(directory), key="master")}


@pytest.fixture
def provider(wrap, providers) -> oss2.crypto.BaseCryptoProvider:
    return providers[wrap]


# Loading a key checks it, which takes a while: each is loaded once, and varied with dataclasses.replace.
@pytest.fixture(scope="session")
def first_key(key_pairs) -> MasterKey:
    return MasterKey.from_pem("master", key_pairs[0][0])


@pytest.fixture(scope="session")
def second_key(key_pairs) -> MasterKey:
    return MasterKey.from_pem("second", key_pairs[1][0])


@pytest.fixture
def master(wrap, first_key) -> MasterKey:
    return replace(first_key, wrap=wrap)


@pytest.fixture
def material(first_key) -> envelope.ContentMaterial:
    return envelope.new_material(first_key)


@pytest.fixture(scope="module")
def upstream(ca):
    with OssUpstream(ca, {ACCESS_KEY: SECRET_KEY}) as server:
        server.create_bucket("bucket")
        yield server
    assert server.internal_errors == []


@pytest.fixture(scope="module")
def sdk_session(ca_pem) -> oss2.Session:
    return session(ca_pem)  # one for the module: its connections are kept alive


@pytest.fixture
def bucket(upstream, sdk_session) -> oss2.Bucket:
    return oss2.Bucket(oss2.Auth(ACCESS_KEY, SECRET_KEY), upstream.endpoint_url, "bucket", session=sdk_session)


def crypto_bucket(upstream, sdk_session, provider) -> oss2.CryptoBucket:
    return oss2.CryptoBucket(oss2.Auth(ACCESS_KEY, SECRET_KEY), upstream.endpoint_url, "bucket",
                             crypto_provider=provider, session=sdk_session)


def encrypt(master: MasterKey) -> tuple[bytes, dict[str, str]]:
    """PLAINTEXT encrypted by the engine, and the metadata to store with it."""
    material = envelope.new_material(master)
    return material.cipher()(PLAINTEXT), envelope.render_metadata(material, len(PLAINTEXT), md5_b64(PLAINTEXT))


# --- the format ----------------------------------------------------------------------------------

@pytest.mark.parametrize("matdesc, multipart", [(None, None), (MATDESC, None), (MATDESC, (1_000_000, 102_400))])
def test_metadata_is_header_for_header_what_oss2_writes(provider, master, matdesc, multipart):
    material = envelope.new_material(replace(master, matdesc=matdesc))
    sdk_material = oss2.models.ContentCryptoMaterial(provider.cipher, provider.wrap_alg, material.wrapped_key,
                                                     material.wrapped_iv, matdesc)
    context = oss2.models.MultipartUploadCryptoContext(*multipart) if multipart else None
    expected = sdk_material.to_object_meta({"content-md5": md5_b64(PLAINTEXT), "content-length": "4099"}, context)
    data_size, part_size = multipart or (None, None)
    rendered = envelope.render_metadata(material, 4099, md5_b64(PLAINTEXT), data_size=data_size, part_size=part_size)
    assert rendered == {name.lower(): value for name, value in expected.items()}


def test_new_material_is_fresh_and_lays_out_the_iv_as_oss2(master):
    first, second = envelope.new_material(master), envelope.new_material(master)
    assert (len(first.data_key), len(first.iv), len(first.wrapped_key)) == (32, 16, 256)
    assert first.iv[8:12] == bytes(4)  # oss2 utils.random_iv
    assert first.data_key != second.data_key and first.iv != second.iv
    assert master.unwrap_secret(first.wrapped_key, master.wrap) == first.data_key


def test_ciphertext_is_aes256_ctr_counting_from_the_iv(material):
    independent = AES.new(material.data_key, AES.MODE_CTR, nonce=b"", initial_value=material.iv)
    assert material.cipher()(PLAINTEXT) == independent.encrypt(PLAINTEXT)


def test_part_size_must_be_announced_with_the_data_size_and_be_block_aligned(material):
    with pytest.raises(ValueError, match="both"):
        envelope.render_metadata(material, data_size=1_000_000)
    with pytest.raises(ValueError, match="multiple of 16"):
        envelope.render_metadata(material, data_size=1_000_000, part_size=100_001)


# --- interoperation with oss2's CryptoBucket -------------------------------------------------------

def test_oss2_crypto_bucket_reads_what_the_engine_wrote(upstream, sdk_session, bucket, provider, master):
    ciphertext, metadata = encrypt(master)
    bucket.put_object("by-engine", ciphertext, headers=metadata)
    assert upstream.stored_bytes("bucket", "by-engine") == ciphertext != PLAINTEXT

    sdk = crypto_bucket(upstream, sdk_session, provider)
    assert sdk.get_object("by-engine").read() == PLAINTEXT
    for first, last in SDK_RANGES:
        got = sdk.get_object("by-engine", byte_range=(first, last)).read()
        assert got == PLAINTEXT[first:None if last is None else last + 1], (first, last)


def test_engine_reads_what_oss2_crypto_bucket_wrote(upstream, sdk_session, bucket, provider, master):
    crypto_bucket(upstream, sdk_session, provider).put_object("by-sdk", PLAINTEXT)
    assert len(upstream.stored_bytes("bucket", "by-sdk")) == len(PLAINTEXT)

    whole = bucket.get_object("by-sdk")
    material = envelope.parse_metadata(whole.headers, [master])
    assert (material.wrap, material.master_key_name) == (master.wrap, "master")
    assert material.cipher()(whole.read()) == PLAINTEXT
    for header in RANGES:
        plan = envelope.plan_range(header, len(PLAINTEXT))
        got = bucket.get_object("by-sdk", headers={"Range": plan.upstream_range})
        assert got.headers["Content-Range"] == f"bytes {plan.upstream_first}-{plan.last}/{len(PLAINTEXT)}"
        assert plan.decryptor(material)(got.read()) == PLAINTEXT[plan.first:plan.last + 1], header


def test_the_material_description_picks_the_master_key_as_in_oss2(upstream, sdk_session, bucket, key_pairs,
                                                                  first_key, second_key):
    described = rsa_provider(*key_pairs[0], described=True)
    crypto_bucket(upstream, sdk_session, described).put_object("described", PLAINTEXT)
    got = bucket.get_object("described")
    ciphertext = got.read()
    assert got.headers[envelope.MATDESC_HEADER] == '{"desc-key": "desc-value"}'

    newer = replace(second_key, name="newer", matdesc={"desc-key": "v2"})
    older = replace(first_key, name="older", matdesc=MATDESC)
    material = envelope.parse_metadata(got.headers, [newer, older])
    assert material.master_key_name == "older" and material.matdesc == MATDESC
    assert material.cipher()(ciphertext) == PLAINTEXT
    with pytest.raises(WrongKey, match="material description"):
        envelope.parse_metadata(got.headers, [replace(first_key, name="undescribed")])
    with pytest.raises(WrongKey, match="'impostor'"):
        envelope.parse_metadata(got.headers, [replace(second_key, name="impostor", matdesc=MATDESC)])


def test_oss2_finds_the_engines_material_description(upstream, sdk_session, bucket, key_pairs, first_key):
    ciphertext, metadata = encrypt(replace(first_key, matdesc=MATDESC))
    bucket.put_object("described-by-engine", ciphertext, headers=metadata)
    described = rsa_provider(*key_pairs[0], described=True)
    assert crypto_bucket(upstream, sdk_session, described).get_object("described-by-engine").read() == PLAINTEXT
    with pytest.raises(oss2.exceptions.ClientError, match="material description"):
        crypto_bucket(upstream, sdk_session, rsa_provider(*key_pairs[0])).get_object("described-by-engine")


def test_older_master_keys_are_tried_in_order(master, second_key):
    _, metadata = encrypt(master)
    other = replace(second_key, name="rotated-out", wrap=master.wrap)
    assert envelope.parse_metadata(metadata, [other, master]).master_key_name == "master"
    with pytest.raises(ValueError, match="between 1 and 16"):
        envelope.parse_metadata(metadata, [other] * 16 + [master])


# --- streaming -------------------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 1, 16, 17, 4000])
@pytest.mark.parametrize("chunk_size", [1, 7, 16, 4097])
def test_streaming_in_any_chunks_equals_one_shot(material, offset, chunk_size):
    whole = material.cipher(offset)(PLAINTEXT[offset:])
    stream = material.cipher(offset)
    chunks = [stream(PLAINTEXT[start:start + chunk_size]) for start in range(offset, len(PLAINTEXT), chunk_size)]
    assert stream(b"") == b""  # mitmproxy's end of stream
    assert b"".join(chunks) == whole == material.cipher()(PLAINTEXT)[offset:]


def test_discarded_bytes_are_dropped_across_chunks(material):
    stream = material.cipher(16, discard=20)
    assert [stream(PLAINTEXT[16:26]), stream(PLAINTEXT[26:46])] == [b"", material.cipher(36)(PLAINTEXT[36:46])]


# --- refusals --------------------------------------------------------------------------------------

def test_an_object_without_metadata_is_missing_its_envelope(master):
    with pytest.raises(MissingEnvelope):
        envelope.parse_metadata({"Content-Length": "5", "x-oss-meta-owner": "me"}, [master])
    with pytest.raises(UnsupportedEnvelope, match="first client-side format"):
        envelope.parse_metadata({"x-oss-meta-oss-crypto-key": "AAAA"}, [master])


def tampered(metadata: dict[str, str], header: str, value: str | None) -> dict[str, str]:
    changed = {**metadata, header: value}
    return {name: value for name, value in changed.items() if value is not None}


def flipped(text: str) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[100] ^= 1
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("header, change, error, message", [
    (envelope.START_HEADER, lambda value: None, MalformedEnvelope, "lacks x-oss-meta-client-side-encryption-start"),
    (envelope.KEY_HEADER, lambda value: value[:-4] + "!!!!", MalformedEnvelope, "not valid base64"),
    (envelope.KEY_HEADER, lambda value: value[:-8], MalformedEnvelope, "modulus"),
    (envelope.KEY_HEADER, flipped, WrongKey, "unwraps"),
    (envelope.START_HEADER, flipped, WrongKey, "unwraps"),
    (envelope.CEK_ALG_HEADER, lambda value: "AES/GCM/NoPadding", UnsupportedEnvelope, "AES/GCM/NoPadding"),
    (envelope.WRAP_ALG_HEADER, lambda value: "KMS/ALICLOUD", UnsupportedEnvelope, "KMS/ALICLOUD"),
    (envelope.MATDESC_HEADER, lambda value: "{not json", MalformedEnvelope, "not JSON"),
    (envelope.MATDESC_HEADER, lambda value: '["a"]', MalformedEnvelope, "not a JSON object"),
])
def test_damaged_or_tampered_metadata_is_refused(master, header, change, error, message):
    _, metadata = encrypt(master)
    with pytest.raises(error, match=message):
        envelope.parse_metadata(tampered(metadata, header, change(metadata.get(header))), [master])


def test_a_wrong_master_key_is_named_and_no_key_material_is_shown(master, second_key):
    material = envelope.new_material(master)
    metadata = envelope.render_metadata(material)
    with pytest.raises(WrongKey) as raised:
        envelope.parse_metadata(metadata, [replace(second_key, name="stranger", wrap=master.wrap)])
    assert "'stranger'" in str(raised.value)
    for secret in (material.data_key, material.iv, material.wrapped_key):
        assert base64.b64encode(secret).decode() not in str(raised.value) and secret.hex() not in str(raised.value)
    assert "data_key" not in repr(material) and "private_key" not in repr(master)


def test_both_parts_are_unwrapped_whichever_fails_so_the_time_tells_nothing(master, second_key, monkeypatch):
    _, metadata = encrypt(master)
    unwrapped = []
    unwrap = MasterKey.unwrap_secret
    monkeypatch.setattr(MasterKey, "unwrap_secret",
                        lambda key, wrapped, wrap: unwrapped.append(wrapped) or unwrap(key, wrapped, wrap))
    with pytest.raises(WrongKey):
        envelope.parse_metadata(metadata, [replace(second_key, wrap=master.wrap)])
    assert len(unwrapped) == 2


def test_a_master_key_must_be_an_rsa_private_key():
    with pytest.raises(ValueError, match="not a PEM private key"):
        MasterKey.from_pem("broken", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


# --- range planning --------------------------------------------------------------------------------

@pytest.mark.parametrize("header, plan", [
    ("bytes=0-0", RangePlan(0, 0, 100)),
    ("bytes=20-40", RangePlan(20, 40, 100)),
    ("bytes=17-", RangePlan(17, 99, 100)),
    ("bytes=-10", RangePlan(90, 99, 100)),
    ("bytes=-150", RangePlan(0, 99, 100)),
    ("bytes=50-500", RangePlan(50, 99, 100)),
    (None, None), ("bytes=5-3", None), ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=-", None),
])
def test_client_ranges_resolve_as_rfc_9110_says(header, plan):
    assert envelope.plan_range(header, 100) == plan


def test_a_plan_asks_from_the_start_of_the_block_and_trims_to_the_clients_range():
    plan = envelope.plan_range("bytes=-10", 100)
    assert (plan.upstream_range, plan.upstream_first, plan.trim_start) == ("bytes=80-99", 80, 10)
    assert (plan.content_range, plan.content_length) == ("bytes 90-99/100", 10)
    aligned = envelope.plan_range("bytes=32-47", 100)
    assert (aligned.upstream_range, aligned.trim_start, aligned.content_length) == ("bytes=32-47", 0, 16)


@pytest.mark.parametrize("header, size", [("bytes=100-", 100), ("bytes=100-200", 100), ("bytes=-0", 100),
                                          ("bytes=0-", 0), ("bytes=-5", 0)])
def test_ranges_past_the_end_are_not_satisfiable(header, size):
    with pytest.raises(RangeNotSatisfiable):
        envelope.plan_range(header, size)
    # OSS by default serves the whole object instead (docs/oss.md, GetObject ranges).
    assert envelope.plan_range(header, size, ignore_out_of_range=True) is None


@pytest.mark.parametrize("header", ["bytes=-150", "bytes=50-500"])
def test_oss_by_default_serves_the_whole_object_for_ranges_reaching_outside_it(header):
    assert envelope.plan_range(header, 100, ignore_out_of_range=True) is None
    assert envelope.plan_range("bytes=-100", 100, ignore_out_of_range=True) == RangePlan(0, 99, 100)


# --- the Azure Media Services layout ---------------------------------------------------------------

# NIST SP 800-38A, F.5.5 CTR-AES256.Encrypt (https://doi.org/10.6028/NIST.SP.800-38A).
NIST_KEY = bytes.fromhex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4")
NIST_COUNTER = 0xF0F1F2F3F4F5F6F7F8F9FAFBFCFDFEFF
NIST_PLAINTEXT = bytes.fromhex("6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
                               "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710")
NIST_CIPHERTEXT = bytes.fromhex("601ec313775789a5b7a7f504bbf3d228f443e3ca4d62b59aca84e990cacaf5c5"
                                "2b0930daa23de94ce87017ba2d84988ddfc9c58db67aada613c2dd08457941a6")
SEED_IV = 397304628502661816  # the AssetFile InitializationVector in azure-media-storage-encryption-aes-ctr.txt


@pytest.mark.parametrize("skip", [0, 5, 16, 37])
def test_both_counter_layouts_reproduce_nist_ctr_aes256(skip):
    oss_layout = envelope.AesCtrStream(NIST_KEY, NIST_COUNTER, skip)
    # The same counter blocks, read as Azure's 64-bit IV and 64-bit block index.
    iv, block = divmod(NIST_COUNTER, 1 << 64)
    azure_layout = envelope.azure_media_stream(NIST_KEY, iv, block * 16 + skip)
    assert oss_layout(NIST_PLAINTEXT[skip:]) == azure_layout(NIST_PLAINTEXT[skip:]) == NIST_CIPHERTEXT[skip:]


@pytest.mark.parametrize("offset", [0, 9, 4096])
def test_azure_layout_is_iv_then_block_index_big_endian(offset):
    key = os.urandom(32)
    # pycryptodome builds each counter block as the 8-byte nonce, then an 8-byte big-endian block counter.
    independent = AES.new(key, AES.MODE_CTR, nonce=SEED_IV.to_bytes(8, "big"), initial_value=0).encrypt(PLAINTEXT)
    assert envelope.azure_media_stream(key, SEED_IV, offset)(PLAINTEXT[offset:]) == independent[offset:]
    with pytest.raises(ValueError, match="64-bit"):
        envelope.azure_media_stream(key, 1 << 64)


def test_azure_key_checksum_detects_a_wrong_content_key():
    # FIPS-197 C.3: AES-256 with key 00..1f turns 00112233..ff into 8ea2b7ca516745bf...; the key id is the
    # GUID whose .NET byte layout is that block, so its checksum is base64(8ea2b7ca516745bf).
    key, key_id = bytes(range(32)), uuid.UUID(bytes_le=bytes.fromhex("00112233445566778899aabbccddeeff"))
    assert envelope.azure_media_key_checksum(key, key_id) == "jqK3ylFnRb8="
    envelope.check_azure_media_key(key, key_id, "jqK3ylFnRb8=")
    with pytest.raises(WrongKey):
        envelope.check_azure_media_key(os.urandom(32), key_id, "jqK3ylFnRb8=")


def test_azure_key_ids_use_the_dotnet_guid_byte_layout():
    # Microsoft's Guid.ToByteArray example (https://learn.microsoft.com/dotnet/api/system.guid.tobytearray).
    key_id = envelope.azure_media_key_id("nb:kid:UUID:35918bc9-196d-40ea-9779-889d79b753f0")
    assert key_id.bytes_le == bytes.fromhex("C98B91356D19EA409779889D79B753F0")
