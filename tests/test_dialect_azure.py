import base64

import pytest

from keycourier.dialects import BadRequest, Encryption, azure
from keycourier.keys import Key
from keycourier.message import Request

# The example key and SHA-256 from Azure's announcement of customer-provided keys (docs/azure.md).
SEED_KEY = Key("seed", "v1", base64.b64decode("MDEyMzQ1NjcwMTIzNDU2NzAxMjM0NTY3MDEyMzQ1Njc="))
SEED_KEY_SHA256 = "3QFFFpRA5+XANHqwwbT4yXDmrT/2JaLt/FKHjzhOdoE="


def request(method, target, host="127.0.0.1", port=10000, **headers):
    pairs = (("host", f"{host}:{port}"),) + tuple((k.replace("_", "-"), v) for k, v in headers.items())
    return Request(method, "https", host, port, target, pairs)


@pytest.mark.parametrize("method, target, headers, name", [
    ("PUT", "/acct/c/b", {"x_ms_blob_type": "BlockBlob"}, "PutBlob"),
    ("PUT", "/acct/c/b?comp=block&blockid=QQ%3D%3D", {}, "PutBlock"),
    ("PUT", "/acct/c/b?comp=block&blockid=QQ%3D%3D", {"x_ms_copy_source": "https://h/acct/s/b"}, "PutBlockFromURL"),
    ("PUT", "/acct/c/b?comp=blocklist", {}, "PutBlockList"),
    ("PUT", "/acct/c/b?comp=page", {}, "PutPage"),
    ("PUT", "/acct/c/b?comp=appendblock", {}, "AppendBlock"),
    ("PUT", "/acct/c/b?comp=metadata", {}, "SetBlobMetadata"),
    ("PUT", "/acct/c/b?comp=snapshot", {}, "SnapshotBlob"),
    ("PUT", "/acct/c/b", {"x_ms_copy_source": "https://h/acct/s/b", "x_ms_blob_type": "BlockBlob"}, "PutBlobFromURL"),
    ("PUT", "/acct/c/b", {"x_ms_copy_source": "https://h/acct/s/b", "x_ms_requires_sync": "True"}, "CopyBlobFromURL"),
    ("PUT", "/acct/c/b", {"x_ms_copy_source": "https://h/acct/s/b"}, "CopyBlob"),
    ("GET", "/acct/c/b", {}, "GetBlob"),
    ("HEAD", "/acct/c/b", {}, "GetBlobProperties"),
    ("GET", "/acct/c/b?comp=metadata", {}, "GetBlobMetadata"),
    ("DELETE", "/acct/c/b", {}, "DeleteBlob"),
    ("PUT", "/acct/c?restype=container", {}, "CreateContainer"),
    ("GET", "/acct/c?restype=container&comp=list", {}, "ListBlobs"),
    ("GET", "/acct/?comp=list", {}, "ListContainers"),
    ("PUT", "/acct/c/b?comp=made-up", {}, "Other"),
    ("PUT", "/acct/c?restype=container&comp=metadata", {}, "SetContainerMetadata"),
    ("PUT", "/acct/c?restype=container&comp=acl", {}, "SetContainerACL"),
    ("POST", "/acct/c?restype=container&comp=batch", {}, "SubmitBatch"),
    ("POST", "/acct/?comp=batch", {}, "SubmitBatch"),
    ("GET", "/acct/?restype=service&comp=properties", {}, "GetBlobServiceProperties"),
    ("PUT", "/acct/rootblob", {"x_ms_blob_type": "BlockBlob"}, "PutBlob"),
])
def test_operations(method, target, headers, name):
    operation = azure.classify(request(method, target, **headers))
    assert operation.name == name
    assert operation.accepts_encryption == (name in azure.KEY_OPERATIONS)


@pytest.mark.parametrize("host, target, endpoint, where", [
    ("acct.blob.core.windows.net", "/c/dir/b.txt", "*.blob.core.windows.net", ("acct", "c", "dir/b.txt")),
    ("127.0.0.1", "/acct/c/dir/b.txt", "127.0.0.1:10000", ("acct", "c", "dir/b.txt")),
    ("acct.blob.storage.internal", "/c/b", "*.blob.storage.internal", ("acct", "c", "b")),
    ("acct.blob.core.windows.net", "/c?restype=container", "*.blob.core.windows.net", ("acct", "c", None)),
    # A lone name is a blob in the root container, as Azure reads it.
    ("acct.blob.core.windows.net", "/b.txt", "*.blob.core.windows.net", ("acct", "$root", "b.txt")),
    ("127.0.0.1", "/acct/b.txt", "127.0.0.1:10000", ("acct", "$root", "b.txt")),
])
def test_account_container_and_blob(host, target, endpoint, where):
    operation = azure.classify(request("GET", target, host=host, port=443), endpoint)
    assert (operation.account, operation.bucket, operation.object_key) == where


def test_copy_source_url_is_mapped_to_account_container_and_blob():
    operation = azure.classify(request("PUT", "/acct/c/b", x_ms_blob_type="BlockBlob",
                                       x_ms_copy_source="https://other.blob.core.windows.net/src/d%20e.txt?sv=1&sig=x"))
    assert (operation.copy_source.account, operation.copy_source.bucket, operation.copy_source.object_key) == ("other", "src", "d e.txt")
    with pytest.raises(BadRequest):
        azure.classify(request("PUT", "/acct/c/b", x_ms_copy_source="not a url"))


def test_render_uses_the_sha256_of_the_raw_key_as_azure_documents():
    rendered, added = azure.render(request("PUT", "/acct/c/b"), Encryption(key=SEED_KEY, source_key=SEED_KEY))
    assert rendered.header("x-ms-encryption-key-sha256") == SEED_KEY_SHA256
    assert rendered.header("x-ms-encryption-key") == "MDEyMzQ1NjcwMTIzNDU2NzAxMjM0NTY3MDEyMzQ1Njc="
    assert rendered.header("x-ms-source-encryption-key-sha256") == SEED_KEY_SHA256
    assert rendered.header("x-ms-encryption-algorithm") == "AES256"
    assert len(added) == 6 and azure.key_fingerprint(SEED_KEY) == SEED_KEY_SHA256


def test_client_cpk_headers_are_found_but_encryption_scopes_are_not_keys():
    sent = request("GET", "/acct/c/b", X_MS_Encryption_Key="abc", x_ms_encryption_scope="scope1")
    assert azure.client_key_headers(sent) == ["x-ms-encryption-key"]
