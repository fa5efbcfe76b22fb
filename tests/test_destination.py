"""The one predicate deciding interception and policy: host spellings, server names, reached addresses."""
import pytest

from keycourier.destination import Destination, EndpointAddresses, intercept
from keycourier.hostnames import canonical_host
from keycourier.policy import parse_policy

POLICY = parse_policy("""
version: 1
endpoints:
  - {host: "127.0.0.1:9000", provider: s3}
  - {host: "minio.internal:9000", provider: s3}
  - {host: "*.amazonaws.com", provider: s3}
rules: []
""")
ADDRESSES = EndpointAddresses(resolve=lambda host: {"minio.internal": ["10.0.0.7", "fd00::7"]}[host])
ADDRESSES.refresh(POLICY)


@pytest.mark.parametrize("spelling, canonical", [
    ("127.0.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"), ("127.1", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("[::ffff:127.0.0.1]", "127.0.0.1"), ("[::1]", "::1"),
    ("BUCKET.S3.AmazonAWS.com.", "bucket.s3.amazonaws.com"), ("minio.internal.", "minio.internal"),
    ("12345.example", "12345.example"), ("fe80::1%eth0", "fe80::1"),
    ("X" * 300 + ".Example.", "x" * 300 + ".example"),  # longer than any DNS name: canonicalised, not remembered
])
def test_every_spelling_has_one_canonical_form(spelling, canonical):
    assert canonical_host(spelling) == canonical


@pytest.mark.parametrize("host, port", [("2130706433", 9000), ("MINIO.internal.", 9000), ("x.S3.amazonaws.COM", 443)])
def test_endpoints_are_found_by_any_spelling_of_their_name(host, port):
    interception = intercept(POLICY, ADDRESSES, Destination.of(host, port))
    assert interception.endpoint is not None and interception.refusal is None


def test_another_name_for_an_endpoints_address_is_an_endpoint_that_refuses():
    interception = intercept(POLICY, ADDRESSES, Destination.of("storage.alias", 9000, address="10.0.0.7"))
    assert interception.endpoint.host == "minio.internal:9000"
    assert "under a name the policy does not give it" in interception.refusal
    interception = intercept(POLICY, ADDRESSES, Destination.of("localhost", 9000, address="127.0.0.1"))
    assert interception.endpoint.host == "127.0.0.1:9000" and interception.refusal


def test_a_server_name_naming_an_endpoint_or_disagreeing_with_one_refuses():
    by_name = intercept(POLICY, ADDRESSES, Destination.of("203.0.113.9", 443, server_name="b.s3.amazonaws.com"))
    assert by_name.endpoint.host == "*.amazonaws.com" and "TLS server name" in by_name.refusal
    mismatch = intercept(POLICY, ADDRESSES, Destination.of("127.0.0.1", 9000, server_name="localhost"))
    assert mismatch.refusal and mismatch.endpoint.host == "127.0.0.1:9000"
    same = intercept(POLICY, ADDRESSES, Destination.of("b.s3.amazonaws.com", 443, server_name="B.s3.amazonaws.com."))
    assert same.endpoint and same.refusal is None


@pytest.mark.parametrize("destination", [
    Destination.of("example.com", 443, address="93.184.215.14"), Destination.of("127.0.0.1", 9001, address="127.0.0.1"),
    Destination.of("10.0.0.7", 9001, address="10.0.0.7"), Destination.of("amazonaws.com.evil.example", 443),
])
def test_other_hosts_are_not_endpoints(destination):
    assert intercept(POLICY, ADDRESSES, destination).endpoint is None


def test_endpoint_names_that_do_not_resolve_are_reported_and_matched_by_name_only():
    addresses = EndpointAddresses(resolve=lambda host: (_ for _ in ()).throw(OSError("no such host")))
    assert addresses.refresh(POLICY) == ["minio.internal"]
    assert intercept(POLICY, addresses, Destination.of("minio.internal", 9000)).endpoint is not None
    assert intercept(POLICY, addresses, Destination.of("alias", 9000, address="10.0.0.7")).endpoint is None
