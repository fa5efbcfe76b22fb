from keycourier.pipeline import Audit
from keycourier.response import REDACTED, explain_upstream_error, header_safe, redact_headers


def test_header_safe_keeps_client_input_on_one_line():
    assert header_safe("no rule covers b/evil\r\nSet-Cookie: x") == "no rule covers b/evil??Set-Cookie: x"
    assert header_safe("ключ") == "????"


def test_redact_headers_replaces_only_secret_values_case_insensitively():
    headers = (("X-Amz-Server-Side-Encryption-Customer-Key", "c2VjcmV0"), ("x-amz-server-side-encryption-customer-key-MD5", "md5"))
    assert redact_headers(headers, ["x-amz-server-side-encryption-customer-key"]) == [
        ("X-Amz-Server-Side-Encryption-Customer-Key", REDACTED), ("x-amz-server-side-encryption-customer-key-MD5", "md5")]


def test_a_403_on_an_sse_c_write_is_explained_in_plain_words():
    audit = Audit(provider="s3", bucket="payroll-new", operation="PutObject", key="payroll")
    body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
    assert "the bucket must allow SSE-C" in explain_upstream_error(audit, 403, body)
    assert explain_upstream_error(Audit(provider="s3", operation="PutObject"), 403, body) is None  # no key: no SSE-C
    assert explain_upstream_error(audit, 404, b"<Error><Code>NoSuchKey</Code></Error>") is None


def test_azure_answer_is_translated_into_s3_sse_c_headers():
    from keycourier.pipeline import RespondAs
    from keycourier.response import translate_response

    respond_as = RespondAs("s3", md5_b64="MD5==", sha256_b64="SHA==", write=True)
    azure = [("ETag", '"x"'), ("x-ms-request-server-encrypted", "true"), ("x-ms-encryption-key-sha256", "SHA==")]
    assert translate_response(azure, "azure", respond_as) == [
        ("ETag", '"x"'), ("x-ms-request-server-encrypted", "true"),
        ("x-amz-server-side-encryption-customer-algorithm", "AES256"),
        ("x-amz-server-side-encryption-customer-key-MD5", "MD5==")]
    s3_answer = [("x-amz-server-side-encryption-customer-key-MD5", "MD5=="), ("x-amz-server-side-encryption-customer-algorithm", "AES256")]
    assert translate_response(s3_answer, "s3", RespondAs("azure", "MD5==", "SHA==", write=False)) == [
        ("x-ms-encryption-key-sha256", "SHA=="), ("x-ms-server-encrypted", "true")]
    assert translate_response([("ETag", '"x"')], "azure", respond_as) == [("ETag", '"x"')]
