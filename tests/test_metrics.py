import random
import re
import string
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase

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


def test_counting_passes_bytes_through_and_counts_them_a_mib_at_a_time_and_at_the_end():
    labels = {"provider": "s3", "direction": "upload"}
    before = metrics.REGISTRY.get_sample_value("keycourier_body_bytes_total", labels) or 0

    def counted():
        return metrics.REGISTRY.get_sample_value("keycourier_body_bytes_total", labels) - before

    count = metrics.counting("s3", "upload", lambda data: data * 2)
    assert count(b"abc") == b"abcabc" and counted() == 0
    count(bytes(metrics.COUNT_EVERY_BYTES // 2))
    assert counted() == 6 + metrics.COUNT_EVERY_BYTES
    assert count(b"xy") == b"xyxy" and counted() == 6 + metrics.COUNT_EVERY_BYTES
    assert count(b"") == b"" and counted() == 6 + metrics.COUNT_EVERY_BYTES + 4


def test_translations_are_counted_by_dialect_pair():
    from keycourier.pipeline import Audit

    labels = {"from_dialect": "s3", "to_dialect": "azure"}
    before = metrics.REGISTRY.get_sample_value("keycourier_translations_total", labels) or 0
    metrics.record_decision(Audit(provider="azure", operation="PutBlob", rule="rule3", action="passthrough",
                                  translation="s3->azure"))
    metrics.record_decision(Audit(provider="azure", operation="PutBlob", rule="rule3", action="passthrough",
                                  translation="s3->azure", outcome="refused", reason="translation"))
    assert metrics.REGISTRY.get_sample_value("keycourier_translations_total", labels) - before == 1


def readme_metrics_table() -> dict[str, dict[str, list[str]]]:
    """README's metric table: each metric's labels, and the values listed for each label."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme[readme.index("| metric | labels |"):]
    table = table[: table.index("\n\n")]
    documented = {}
    for row in table.splitlines()[2:]:
        names_cell, labels_cell = row.strip("|").split("|")
        labels = {}
        for label, values in re.findall(r"(?:^|, )([a-z_]+)(?: \(([^)]*)\))?", labels_cell.strip()):
            labels[label] = re.findall(r"`([a-z_]+)`", values)
        for name in re.findall(r"`([a-z_]+)`", names_cell):
            documented[name] = labels
    return documented


def test_the_readme_table_is_what_is_exported():
    documented = readme_metrics_table()
    declared = {metric._name: metric for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)}
    exported = {family.name: family for family in metrics.REGISTRY.collect() if family.name.startswith("keycourier_")}
    assert exported.keys() == declared.keys()
    # A counter's samples are named with `_total`, as the README names them.
    names = {name + ("_total" if family.type == "counter" else ""): name for name, family in exported.items()}
    assert documented.keys() == names.keys()
    for name, labels in documented.items():
        assert list(labels) == list(declared[names[name]]._labelnames), name
        if exported[names[name]].type == "counter" and len(labels) == 1:
            ((label, values),) = labels.items()
            samples = {sample.labels[label] for sample in exported[names[name]].samples if sample.name == name}
            assert set(values) == samples, name  # all of them, from the start


def test_alerts_label_sets_exist_from_the_start_at_zero():
    for name, labels in {"keycourier_refusals_total": {"reason": "key_unavailable"},
                         "keycourier_vault_requests_total": {"outcome": "unreachable"},
                         "keycourier_policy_reloads_total": {"outcome": "failure"},
                         "keycourier_key_cache_total": {"result": "stale"},
                         "keycourier_connections_closed_total": {"reason": "became_endpoint"}}.items():
        assert metrics.REGISTRY.get_sample_value(name, labels) is not None, name


def test_build_info_and_process_metrics():
    from keycourier import __version__

    assert metrics.REGISTRY.get_sample_value("keycourier_build_info", {"version": __version__}) == 1
    assert metrics.REGISTRY.get_sample_value("process_resident_memory_bytes") > 0
    assert metrics.UPSTREAM_SECONDS._upper_bounds[-2] >= 1800  # a multi-GiB transfer lands in a bucket, not +Inf
