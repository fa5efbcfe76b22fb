import base64
import hashlib

import pytest

from keycourier.dialects import BadRequest, Encryption
from keycourier.dialects import s3
from keycourier.keys import Key
from keycourier.message import Request

KEY = Key("payroll", "v1", bytes(range(32)))


def request(method, target, host="127.0.0.1", port=9000, **headers):
    pairs = (("host", f"{host}:{port}"),) + tuple((k.replace("_", "-"), v) for k, v in headers.items())
    return Request(method, "https", host, port, target, pairs)


@pytest.mark.parametrize("method, target, headers, name, bucket, key", [
    ("GET", "/", {}, "ListBuckets", None, None),
    ("PUT", "/payroll", {}, "CreateBucket", "payroll", None),
    ("HEAD", "/payroll", {}, "HeadBucket", "payroll", None),
    ("GET", "/payroll?list-type=2&prefix=a%2F", {}, "ListObjectsV2", "payroll", None),
    ("GET", "/payroll", {}, "ListObjects", "payroll", None),
    ("GET", "/payroll?uploads", {}, "ListMultipartUploads", "payroll", None),
    ("POST", "/payroll?delete", {}, "DeleteObjects", "payroll", None),
    ("GET", "/payroll?versioning", {}, "GetBucketVersioning", "payroll", None),
    ("PUT", "/payroll/a/b.txt", {}, "PutObject", "payroll", "a/b.txt"),
    ("PUT", "/payroll/a%20b%2Bc.txt", {}, "PutObject", "payroll", "a b+c.txt"),
    ("GET", "/payroll/a.txt", {}, "GetObject", "payroll", "a.txt"),
    ("GET", "/payroll/a.txt?versionId=3", {}, "GetObject", "payroll", "a.txt"),
    ("HEAD", "/payroll/a.txt", {}, "HeadObject", "payroll", "a.txt"),
    ("DELETE", "/payroll/a.txt", {}, "DeleteObject", "payroll", "a.txt"),
    ("POST", "/payroll/a.txt?uploads", {}, "CreateMultipartUpload", "payroll", "a.txt"),
    ("PUT", "/payroll/a.txt?partNumber=2&uploadId=u", {}, "UploadPart", "payroll", "a.txt"),
    ("PUT", "/payroll/a.txt?partNumber=2&uploadId=u", {"x_amz_copy_source": "/src/b.txt"}, "UploadPartCopy", "payroll", "a.txt"),
    ("POST", "/payroll/a.txt?uploadId=u", {}, "CompleteMultipartUpload", "payroll", "a.txt"),
    ("DELETE", "/payroll/a.txt?uploadId=u", {}, "AbortMultipartUpload", "payroll", "a.txt"),
    ("GET", "/payroll/a.txt?uploadId=u", {}, "ListParts", "payroll", "a.txt"),
    ("GET", "/payroll/a.txt?attributes", {}, "GetObjectAttributes", "payroll", "a.txt"),
    ("POST", "/payroll/a.txt?select&select-type=2", {}, "SelectObjectContent", "payroll", "a.txt"),
    ("PUT", "/payroll/a.txt?tagging", {}, "PutObjectTagging", "payroll", "a.txt"),
    ("PUT", "/payroll/a.txt", {"x_amz_copy_source": "src/b.txt"}, "CopyObject", "payroll", "a.txt"),
])
def test_path_style_operations(method, target, headers, name, bucket, key):
    operation = s3.classify(request(method, target, **headers))
    assert (operation.name, operation.bucket, operation.object_key) == (name, bucket, key)
    assert operation.accepts_encryption == (name in {
        "PutObject", "GetObject", "HeadObject", "CreateMultipartUpload", "UploadPart", "UploadPartCopy",
        "CopyObject", "GetObjectAttributes", "SelectObjectContent"})


@pytest.mark.parametrize("host, bucket", [
    ("payroll.s3.amazonaws.com", "payroll"),
    ("payroll.s3.eu-west-1.amazonaws.com", "payroll"),
    ("payroll.s3-eu-west-1.amazonaws.com", "payroll"),
    ("pay.roll.s3.dualstack.us-east-1.amazonaws.com", "pay.roll"),
    ("payroll.s3.cn-north-1.amazonaws.com.cn", "payroll"),
])
def test_virtual_hosted_style(host, bucket):
    operation = s3.classify(request("PUT", "/dir/x.csv", host=host, port=443))
    assert (operation.name, operation.bucket, operation.object_key) == ("PutObject", bucket, "dir/x.csv")


def test_path_style_on_aws_service_host():
    operation = s3.classify(request("GET", "/payroll/x", host="s3.eu-west-1.amazonaws.com", port=443))
    assert (operation.bucket, operation.object_key) == ("payroll", "x")


def test_copy_source_names_bucket_and_key_and_drops_version():
    operation = s3.classify(request("PUT", "/dst/a", x_amz_copy_source="/src/dir/b%20c.txt?versionId=7"))
    assert (operation.copy_source.bucket, operation.copy_source.object_key) == ("src", "dir/b c.txt")


@pytest.mark.parametrize("source", ["/", "/only-bucket", "arn:aws:s3:us-east-1:1:accesspoint/ap/object/k"])
def test_unmappable_copy_source_is_a_bad_request(source):
    with pytest.raises(BadRequest):
        s3.classify(request("PUT", "/dst/a", x_amz_copy_source=source))


def test_render_key_adds_sse_c_headers_with_md5_of_raw_key():
    rendered, added = s3.render(request("PUT", "/b/k"), Encryption(key=KEY))
    assert rendered.header("x-amz-server-side-encryption-customer-algorithm") == "AES256"
    assert base64.b64decode(rendered.header("x-amz-server-side-encryption-customer-key")) == KEY.material
    # MD5 of the raw 32 bytes, not of their base64 text (docs/s3.md)
    assert rendered.header("x-amz-server-side-encryption-customer-key-MD5") == base64.b64encode(hashlib.md5(KEY.material).digest()).decode()
    assert sorted(added) == sorted(f"x-amz-server-side-encryption-customer-{n}" for n in ("algorithm", "key", "key-md5"))


def test_render_copy_source_key_separately():
    source = Key("old", "v2", b"\x01" * 32)
    rendered, added = s3.render(request("PUT", "/b/k", x_amz_copy_source="/s/k"), Encryption(key=KEY, source_key=source))
    assert base64.b64decode(rendered.header("x-amz-copy-source-server-side-encryption-customer-key")) == source.material
    assert base64.b64decode(rendered.header("x-amz-server-side-encryption-customer-key")) == KEY.material
    assert len(added) == 6


def test_client_key_headers_are_found_case_insensitively():
    sent = request("GET", "/b/k", X_Amz_Server_Side_Encryption_Customer_Key="abc")
    assert s3.client_key_headers(sent) == ["x-amz-server-side-encryption-customer-key"]
    assert s3.client_key_headers(request("GET", "/b/k")) == []


@pytest.mark.parametrize("host, configured, region", [
    ("s3.eu-west-1.amazonaws.com", None, "eu-west-1"),
    ("payroll.s3.ap-southeast-2.amazonaws.com", None, "ap-southeast-2"),
    ("payroll.s3-us-gov-west-1.amazonaws.com", None, "us-gov-west-1"),
    ("payroll.s3.dualstack.eu-central-1.amazonaws.com", None, "eu-central-1"),
    ("s3.amazonaws.com", None, "us-east-1"),
    ("127.0.0.1", None, "us-east-1"),
    ("minio.internal", "eu-north-1", "eu-north-1"),
])
def test_signing_region(host, configured, region):
    assert s3.signing_region(request("GET", "/b/k", host=host, port=443), configured) == region


@pytest.mark.parametrize("host, endpoint, bucket, key", [
    ("payroll.minio.internal", "*.minio.internal:9000", "payroll", "dir/x.csv"),
    ("pay.roll.minio.internal", "*.minio.internal", "pay.roll", "dir/x.csv"),
    ("minio.internal", "*.minio.internal:9000", "dir", "x.csv"),  # the domain itself: path style
    ("minio.internal", "minio.internal:9000", "dir", "x.csv"),
    ("s3.amazonaws.com", "*.amazonaws.com", "dir", "x.csv"),  # AWS's service host is path style
    ("payroll.s3.amazonaws.com", "*.amazonaws.com", "payroll", "dir/x.csv"),
])
def test_custom_endpoints_with_a_wildcard_are_virtual_hosted(host, endpoint, bucket, key):
    operation = s3.classify(request("PUT", "/dir/x.csv", host=host, port=9000), endpoint)
    assert (operation.bucket, operation.object_key) == (bucket, key)


@pytest.mark.parametrize("method, target", [
    ("PATCH", "/b/k"), ("PROPFIND", "/b"), ("POST", "/"), ("GET", "/b?made-up-subresource-123"),
])
def test_operation_names_never_come_from_client_input(method, target):
    name = s3.classify(request(method, target)).name
    assert name in {"Other", "ListObjects"} and "123" not in name and method.title() not in name
