import random
import string

from prometheus_client import generate_latest

from keycourier import metrics
from tests.test_pipeline import policy, run, signed  # noqa: F401  (policy is a fixture)


def label_sets(name: str) -> set[tuple]:
    return {tuple(sorted(sample.labels.items()))
            for family in metrics.REGISTRY.collect() for sample in family.samples if sample.name == name}


def test_label_cardinality_stays_bounded_whatever_clients_send(policy):
    rng = random.Random(7)
    buckets = []
    for _ in range(600):
        bucket = rng.choice(["payroll-", "public-", "secret-", "x"]) + "".join(rng.choices(string.ascii_lowercase, k=10))
        buckets.append(bucket)
        query = rng.choice(["", "?uploads", "?" + "".join(rng.choices(string.ascii_lowercase, k=8)), "?tagging"])
        method = rng.choice(["GET", "PUT", "HEAD", "DELETE", "POST", "PATCH", "BREW"])
        target = f"/{bucket}/" + "".join(rng.choices(string.ascii_letters, k=12)) + query
        metrics.record_decision(run(policy, signed(method, target)).audit)
    # 5 rules (+ none) x a fixed set of operation names x 3 outcomes: far below one per request.
    assert len(label_sets("keycourier_requests_total")) <= 60
    exposition = generate_latest(metrics.REGISTRY).decode()
    assert not any(bucket in exposition for bucket in buckets)


def test_counting_passes_bytes_through_and_counts_them():
    labels = {"provider": "s3", "direction": "upload"}
    before = metrics.REGISTRY.get_sample_value("keycourier_body_bytes_total", labels) or 0
    count = metrics.counting("s3", "upload", lambda data: data * 2)
    assert count(b"abc") == b"abcabc" and count(b"") == b""
    assert metrics.REGISTRY.get_sample_value("keycourier_body_bytes_total", labels) - before == 6


def test_translations_are_counted_by_dialect_pair():
    from keycourier.pipeline import Audit

    labels = {"from_dialect": "s3", "to_dialect": "azure"}
    before = metrics.REGISTRY.get_sample_value("keycourier_translations_total", labels) or 0
    metrics.record_decision(Audit(provider="azure", operation="PutBlob", rule="rule3", action="passthrough",
                                  translation="s3->azure"))
    metrics.record_decision(Audit(provider="azure", operation="PutBlob", rule="rule3", action="passthrough",
                                  translation="s3->azure", outcome="refused", reason="translation"))
    assert metrics.REGISTRY.get_sample_value("keycourier_translations_total", labels) - before == 1
