import pytest

from keycourier.dialects import Encryption, oss
from keycourier.message import Request


def request(method, target, host="127.0.0.1", port=9000, **headers):
    pairs = (("host", f"{host}:{port}"),) + tuple((k.replace("_", "-"), v) for k, v in headers.items())
    return Request(method, "https", host, port, target, pairs)


@pytest.mark.parametrize("method, target, headers, name, accepts", [
    ("PUT", "/b/k", {}, "PutObject", True),
    ("PUT", "/b/k", {"x_oss_copy_source": "/src/k2"}, "CopyObject", True),
    ("POST", "/b/k?uploads", {}, "InitiateMultipartUpload", True),
    ("POST", "/b/k?append&position=0", {}, "AppendObject", True),
    ("PUT", "/b/k?partNumber=1&uploadId=u", {}, "UploadPart", False),
    ("POST", "/b/k?uploadId=u", {}, "CompleteMultipartUpload", False),
    ("GET", "/b/k", {}, "GetObject", False),
    ("HEAD", "/b/k", {}, "HeadObject", False),
    ("HEAD", "/b/k?objectMeta", {}, "GetObjectMeta", False),
    ("DELETE", "/b/k", {}, "DeleteObject", False),
    ("GET", "/b?prefix=a", {}, "ListObjects", False),
    ("POST", "/b", {"content_type": "multipart/form-data; boundary=x"}, "PostObject", False),
])
def test_operations_and_where_oss_accepts_the_encryption_header(method, target, headers, name, accepts):
    operation = oss.classify(request(method, target, **headers))
    assert (operation.name, operation.accepts_encryption) == (name, accepts)


@pytest.mark.parametrize("host, endpoint, bucket", [
    ("payroll.oss-cn-hangzhou.aliyuncs.com", "*.aliyuncs.com", "payroll"),
    ("payroll.oss-cn-hangzhou-internal.aliyuncs.com", "*.aliyuncs.com", "payroll"),
    ("oss-cn-hangzhou.aliyuncs.com", "*.aliyuncs.com", "dir"),
    ("payroll.oss.example.net", "*.oss.example.net", "payroll"),
])
def test_virtual_hosted_and_path_style(host, endpoint, bucket):
    assert oss.classify(request("PUT", "/dir/k", host=host, port=443), endpoint).bucket == bucket


def test_copy_source_is_mapped():
    operation = oss.classify(request("PUT", "/b/k", x_oss_copy_source="/src/dir/a%20b"))
    assert (operation.copy_source.bucket, operation.copy_source.object_key) == ("src", "dir/a b")


def test_render_kms_with_key_id_and_nothing_without_a_plan():
    rendered, added = oss.render(request("PUT", "/b/k"), Encryption(managed="KMS", managed_key_id="kms-123"))
    assert rendered.header("x-oss-server-side-encryption") == "KMS"
    assert rendered.header("x-oss-server-side-encryption-key-id") == "kms-123"
    assert added == ["x-oss-server-side-encryption", "x-oss-server-side-encryption-key-id"]
    assert oss.render(request("GET", "/b/k"), Encryption()) == (request("GET", "/b/k"), [])


def test_client_sse_headers_are_found():
    assert oss.client_key_headers(request("PUT", "/b/k", X_OSS_Server_Side_Encryption="AES256")) == ["x-oss-server-side-encryption"]
