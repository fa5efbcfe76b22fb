"""One request through keycourier: classify → match policy → check TLS → get key → render dialect → re-sign → forward.

Each step is a function named after it. A step that must stop the request raises `Refused`; nothing
is forwarded then. Everything here works on plain `Request` values, so it is tested without a proxy.
"""
from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from types import ModuleType
from typing import NamedTuple

from keycourier import envelope_flow
from keycourier.destination import Destination, EndpointAddresses, Interception, intercept
from keycourier.dialects import OTHER_OPERATION, PROVIDERS, BadRequest, Encryption, ObjectRef, Operation
from keycourier.keys import Key, KeyUnavailable, Secrets
from keycourier.message import Request
from keycourier.policy import Endpoint, Policy, Rule
from keycourier.refusals import Refusal, Refused
from keycourier.tls import check_tls
from keycourier.versions import PLAINTEXT, KeyChoice, KeyVersions

# A provider is a dialect module plus a signer module of the same name.
DIALECTS: dict[str, ModuleType] = {name: importlib.import_module(f"keycourier.dialects.{name}") for name in PROVIDERS}
SIGNERS: dict[str, ModuleType] = {name: importlib.import_module(f"keycourier.signers.{name}") for name in PROVIDERS}
log = logging.getLogger("keycourier")
SECRET_HEADERS = tuple(name for dialect in DIALECTS.values() for name in dialect.SECRET_HEADERS)


@dataclass(frozen=True)
class Audit:
    """What was decided, for the log: names and fingerprints only, never key material."""

    provider: str | None = None
    account: str | None = None  # Azure storage account
    bucket: str | None = None
    operation: str | None = None
    rule: str | None = None
    action: str | None = None
    key: str | None = None
    key_version: str | None = None
    key_fingerprint: str | None = None
    translation: str | None = None  # from_dialect->to_dialect, when keycourier translated the client's key
    outcome: str = "forwarded"
    reason: str | None = None


@dataclass(frozen=True)
class RespondAs:
    """The dialect a client spoke when keycourier translated its key: the response goes back in it."""

    dialect: str
    md5_b64: str  # fingerprints of the client's key, never the key
    sha256_b64: str
    write: bool


@dataclass(frozen=True)
class Attempt:
    """One way to send a request whose object may be under an older key version, or stored in plaintext."""

    request: Request
    choice: KeyChoice


@dataclass(frozen=True)
class Forward:
    request: Request
    body: Callable[[bytes], bytes] | None = None  # stream transform of the request body, if it must change
    secret_headers: tuple[str, ...] = ()  # header names to redact once sent
    audit: Audit = field(default_factory=Audit)
    respond_as: RespondAs | None = None
    # Tried in turn, until the provider does not answer "wrong key" (or "no customer key"), when the object's
    # key version is not known; `request` is the first of them.
    attempts: tuple[Attempt, ...] = ()
    written: KeyChoice | None = None  # what a write gives its object, remembered once it succeeds
    read: ReadCheck | None = None  # for requests with an existing object's key: how to read the answer
    envelope: envelope_flow.Exchange | None = None  # under an envelope rule: what becomes of the answer


@dataclass(frozen=True)
class ReadCheck:
    key_name: str
    source: bool  # the key is a copy's source's
    plaintext_refusal: str | None  # why a plaintext object is not read (plaintext_reads: deny), to tell the client


@dataclass(frozen=True)
class Refuse:
    refusal: Refusal
    content_type: str
    body: bytes
    audit: Audit


def handle_request(request: Request, *, client_tls: bool, destination: Destination, policy: Policy,
                   addresses: EndpointAddresses, secrets: Secrets, versions: KeyVersions,
                   now: datetime | None = None) -> Forward | Refuse:
    """`request.host` is `destination.host`, canonical. Raises keys.NotCached when a key or credential
    must be loaded first: the caller waits for it without blocking other requests and asks again."""
    interception = intercept(policy, addresses, destination)
    endpoint = interception.endpoint
    if endpoint is None:
        return Forward(request, audit=Audit(outcome="not_an_endpoint"))
    dialect = DIALECTS[endpoint.provider]
    facts = {"provider": endpoint.provider}  # the Audit's fields, known step by step; one Audit made at the end
    try:
        check_form(request, interception)
        operation = classify(request, dialect, endpoint)
        facts.update(account=operation.account, bucket=operation.bucket, operation=operation.name)
        rule, source_rule = match_policy(policy, dialect, operation)
        facts.update(rule=rule.name, action=rule.action)
        enforce_deny(operation, rule, source_rule)
        client_keys = check_client_keys(request, rule)
        envelope = plan_envelope(request, operation, rule, source_rule, policy, secrets)
        plan = plan_encryption(dialect, request, operation, rule, source_rule)
        check_tls(request, client_tls=client_tls, client_sends_key=any(client_keys.values()),
                  injects_key=bool(plan.key or plan.source_key))
        encryption = get_keys(policy, secrets, plan)
        if encryption.key:
            key = encryption.key
            facts.update(key=key.name, key_version=key.version, key_fingerprint=dialect.key_fingerprint(key))
        if envelope and envelope.key:
            facts.update(key=envelope.key.name, key_version=envelope.key.version,
                         key_fingerprint=envelope.key.sha256_b64)
        translated, encryption, respond_as = translate_dialect(request, client_keys, dialect, operation, encryption, policy)
        if envelope:
            translated = translated.with_header_map(envelope.headers)
        if respond_as:
            facts["translation"] = f"{respond_as.dialect}->{dialect.PROVIDER}"

        signed_at, region = now or datetime.now(timezone.utc), dialect.signing_region(request, endpoint.region)

        def prepare(variant: Encryption):
            rendered, added = render_dialect(dialect, translated, variant)
            return re_sign(SIGNERS[endpoint.provider], request, rendered, added, policy, secrets, signed_at, region)

        signed, body = prepare(encryption)
        keyed = keyed_object(dialect, operation, rule, source_rule, encryption)
        attempts = () if respond_as else tuple(
            Attempt(prepare(variant)[0], choice)
            for variant, choice in plan_fallback(request, dialect, keyed, encryption, policy, secrets, versions))
        written = (KeyChoice(operation.target, encryption.key.name, encryption.key.version)
                   if encryption.key and operation.name in dialect.WRITE_OPERATIONS else None)
        if envelope and envelope.body:
            body = envelope.body  # OSS signs no body (signers.oss.body_resigner): nothing else transforms it
        return Forward(attempts[0].request if attempts else signed, body, SECRET_HEADERS, Audit(**facts), respond_as,
                       attempts, written, read_check(keyed), envelope)
    except Refused as refused:
        content_type, body = dialect.error_body(refused.refusal.code, f"keycourier: {refused.refusal.message}")
        return Refuse(refused.refusal, content_type, body, Audit(**facts, outcome="refused", reason=refused.refusal.reason))


# Limits on what keycourier parses and re-signs (docs/security.md); providers allow less (docs/paths.md).
MAX_HEADERS = 200
MAX_HEADER_BYTES = 32 * 1024
MAX_TARGET_BYTES = 16 * 1024
# The methods the object-storage APIs define; anything else is refused where a rule encrypts or denies.
STORAGE_METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "DELETE"})
READ_METHODS = frozenset({"GET", "HEAD"})


def check_form(request: Request, interception: Interception) -> None:
    """What must hold before keycourier can read a request exactly as the provider will."""
    if interception.refusal:
        raise Refused(400, "InvalidRequest", interception.refusal, "unclassifiable")
    if len(request.target) > MAX_TARGET_BYTES:
        raise Refused(414, "RequestURITooLong", f"the request target is longer than {MAX_TARGET_BYTES} bytes", "too_large")
    if len(request.headers) > MAX_HEADERS or sum(len(k) + len(v) + 4 for k, v in request.headers) > MAX_HEADER_BYTES:
        raise Refused(400, "RequestHeaderSectionTooLarge",
                      f"the request has more than {MAX_HEADERS} headers or {MAX_HEADER_BYTES} bytes of them", "too_large")
    if sum(name.lower() == "host" for name, _ in request.headers) > 1:
        raise Refused(400, "InvalidRequest", "the request has more than one Host header", "unclassifiable")
    if request.header("upgrade") is not None:
        raise Refused(400, "InvalidRequest", "object stores take no protocol upgrades; keycourier relays only HTTP to them", "unclassifiable")


def is_object_data(audit: Audit, status: int) -> bool:
    """An answer whose body is the application's own object: passed on byte for byte, never scrubbed."""
    return status < 300 and audit.operation in DIALECTS[audit.provider].DATA_READS


def classify(request: Request, dialect: ModuleType, endpoint: Endpoint) -> Operation:
    try:
        return dialect.classify(request, endpoint.host)
    except BadRequest as exc:
        raise Refused(400, "InvalidRequest", str(exc), "unclassifiable") from None


def match_policy(policy: Policy, dialect: ModuleType, operation: Operation) -> tuple[Rule, Rule | None]:
    """The rule for the request's own object, and for a copy's source object. Operations that name their
    objects in the body (bulk deletes, batches) get the strictest rule any of those objects could have."""
    if operation.name in dialect.BULK_OPERATIONS:
        rule = policy.strictest_rule_for(operation.provider, operation.bucket, operation.account)
        if rule is None:
            raise Refused(403, "AccessDenied", f"no rule in the policy covers {_named(operation.target)}", "no_rule")
        return rule, None
    rule = _rule_for(policy, operation.provider, operation.target)
    source_rule = _rule_for(policy, operation.provider, operation.copy_source) if operation.copy_source else None
    return rule, source_rule


def _rule_for(policy: Policy, provider: str, where: ObjectRef) -> Rule:
    rule = policy.rule_for(provider, where.bucket, where.object_key, where.account)
    if rule is None:
        # Fail closed: a known object store with no rule for this bucket gets nothing through.
        raise Refused(403, "AccessDenied", f"no rule in the policy covers {_named(where)}", "no_rule")
    return rule


def enforce_deny(operation: Operation, rule: Rule, source_rule: Rule | None) -> None:
    """A deny rule on the object, or on a copy's source object, stops the request."""
    for denying, where in ((rule, operation.target), (source_rule, operation.copy_source)):
        if denying and denying.action == "deny":
            raise Refused(403, "AccessDenied", f"{denying.name} denies access to {_named(where)}", "deny")


def _named(where: ObjectRef) -> str:
    """Account and bucket, never the object name: object names may be personal data, and this goes to logs."""
    if not where.bucket:
        return "the service"
    return f"{'account ' + where.account + ' ' if where.account else ''}bucket {where.bucket}"


def check_client_keys(request: Request, rule: Rule) -> dict[str, list[str]]:
    """The key headers the application sent itself, by dialect; refused where keycourier supplies the key."""
    client_keys = {name: dialect.client_key_headers(request) for name, dialect in DIALECTS.items()}
    sent = [header for headers in client_keys.values() for header in headers]
    if sent and rule.action == "encrypt":
        raise Refused(400, "InvalidRequest", f"the request carries its own key headers ({', '.join(sent)}) but keycourier's {rule.name} supplies the key for this bucket; remove them from the application", "client_key")
    return client_keys


class EncryptionPlan(NamedTuple):
    key: str | None = None  # key names, from the policy
    source_key: str | None = None
    managed: str | None = None
    managed_key_id: str | None = None


def plan_encryption(dialect: ModuleType, request: Request, operation: Operation, rule: Rule,
                    source_rule: Rule | None) -> EncryptionPlan:
    """What the request must carry, by the rules for its object and for a copy's source."""
    encrypting, source_encrypted = rule.action == "encrypt", bool(source_rule and source_rule.action == "encrypt")
    # Fail closed on what keycourier cannot name: an unknown operation could write an object.
    unknown = operation.name == OTHER_OPERATION and (operation.object_key or request.method not in READ_METHODS)
    unencryptable = operation.name in dialect.UNENCRYPTABLE_WRITES or unknown or request.method not in STORAGE_METHODS
    if encrypting and unencryptable:
        # Fail closed: what keycourier cannot give encryption headers must not write into an encrypt bucket.
        what = operation.name if request.method in STORAGE_METHODS else f"{request.method[:20]!r}"
        raise Refused(403, "AccessDenied", f"{rule.name} encrypts this bucket, and keycourier cannot add encryption to a {what} request ({operation.provider})", "unencryptable")
    if not dialect.CUSTOMER_KEYS:
        if encrypting and rule.envelope:
            return EncryptionPlan()  # keycourier encrypts the data itself: plan_envelope
        if encrypting and operation.accepts_encryption and not rule.oss_sse:
            # Fail closed: an encrypt rule that cannot say how must not let plaintext through.
            raise Refused(403, "AccessDenied", f"{rule.name} encrypts but gives no oss_sse for this OSS bucket", "deny")
        managed = encrypting and operation.accepts_encryption
        return EncryptionPlan(managed=rule.oss_sse, managed_key_id=rule.kms_key_id) if managed else EncryptionPlan()
    return EncryptionPlan(
        key=rule.key if encrypting and operation.accepts_encryption else None,
        source_key=source_rule.key if source_encrypted and operation.name in dialect.SOURCE_KEY_OPERATIONS else None)


def plan_envelope(request: Request, operation: Operation, rule: Rule, source_rule: Rule | None, policy: Policy,
                  secrets: Secrets) -> envelope_flow.Exchange | None:
    """Envelope rules (OSS client-side encryption): what keycourier makes of the request and of its answer."""
    return envelope_flow.plan(request, operation, rule, source_rule,
                              write_key=lambda: get_key(policy, secrets, rule.key),
                              read_keys=lambda: get_read_keys(policy, secrets, rule.key))


class KeyedObject(NamedTuple):
    slot: str  # the Encryption field holding its key: "key", or "source_key" for a copy's source
    where: ObjectRef
    rule: Rule


def keyed_object(dialect: ModuleType, operation: Operation, rule: Rule, source_rule: Rule | None,
                 encryption: Encryption) -> KeyedObject | None:
    """The existing object whose key keycourier supplies in this request: its own (reads, metadata), or a copy's
    source. After a key rotation it may be under an older version of that key."""
    if encryption.key and operation.name in dialect.FALLBACK_READS:
        return KeyedObject("key", operation.target, rule)
    if encryption.source_key:
        return KeyedObject("source_key", operation.copy_source, source_rule)
    return None


def plan_fallback(request: Request, dialect: ModuleType, keyed: KeyedObject | None, encryption: Encryption,
                  policy: Policy, secrets: Secrets, versions: KeyVersions) -> list[tuple[Encryption, KeyChoice]]:
    """The keys to try, in order, for an object that may be under an older version of its key (or, where
    the rule allows plaintext reads, stored without one): none when there is only one way, or when the
    object is known to be under the key a write would use. Only bodiless requests (reads, copies) can be
    sent again; the first try is the remembered version, else the newest."""
    if keyed is None or request.header("content-length") not in (None, "0") or request.header("transfer-encoding"):
        return []
    written = getattr(encryption, keyed.slot)
    options = [*get_read_keys(policy, secrets, keyed.rule.key)] + ([None] if keyed.rule.plaintext_reads == "allow" else [])
    remembered = versions.recall(keyed.where, written.name)
    if len(options) == 1 or remembered == written.version:
        return []
    options.sort(key=lambda key: (key.version if key else PLAINTEXT) != remembered)  # stable: the rest stay in order
    return [(replace(encryption, **{keyed.slot: key}),
             KeyChoice(keyed.where, written.name, key and key.version, key and dialect.key_fingerprint(key)))
            for key in options]


def read_check(keyed: KeyedObject | None) -> ReadCheck | None:
    if keyed is None:
        return None
    refusal = None if keyed.rule.plaintext_reads == "allow" else (
        f"the object is stored without a customer key and {keyed.rule.name} has plaintext_reads: deny; set "
        "plaintext_reads: allow on it to read objects written before the bucket was encrypted")
    return ReadCheck(keyed.rule.key, keyed.slot == "source_key", refusal)


def get_read_keys(policy: Policy, secrets: Secrets, name: str) -> tuple[Key, ...]:
    try:
        return secrets.read_keys(policy, policy.keys[name])
    except KeyUnavailable as exc:
        raise Refused(503, "ServiceUnavailable", f"cannot get the versions of key {name!r}: {exc}; the request was "
                      "not forwarded", "key_unavailable") from None


def get_keys(policy: Policy, secrets: Secrets, plan: EncryptionPlan) -> Encryption:
    return Encryption(get_key(policy, secrets, plan.key), get_key(policy, secrets, plan.source_key),
                      plan.managed, plan.managed_key_id)


def get_key(policy: Policy, secrets: Secrets, name: str | None) -> Key | None:
    if name is None:
        return None
    try:
        return secrets.key(policy, policy.keys[name])
    except KeyUnavailable as exc:
        raise Refused(503, "ServiceUnavailable", f"cannot get key: {exc}; the request was not forwarded", "key_unavailable") from None


def translate_dialect(request: Request, client_keys: dict[str, list[str]], dialect: ModuleType, operation: Operation,
                      encryption: Encryption, policy: Policy) -> tuple[Request, Encryption, RespondAs | None]:
    """A key the client sent in another provider's dialect, taken out of the request to be rendered in
    this one's (S3 SSE-C <-> Azure CPK; to OSS, the KMS key the policy maps the key to)."""
    spoken = [other for name, other in DIALECTS.items()
              if other is not dialect and other.CUSTOMER_KEYS and client_keys[name]]
    if not spoken:
        return request, encryption, None
    if len(spoken) > 1:
        raise Refused(400, "InvalidRequest", "the request carries key headers of more than one dialect", "translation")
    client_dialect = spoken[0]
    try:
        sent = client_dialect.parse_client_key(request)
    except BadRequest as exc:
        raise Refused(400, "InvalidRequest", f"the {client_dialect.PROVIDER} key headers are invalid: {exc}", "translation") from None
    stripped = request.with_header_map({name: None for name in client_keys[client_dialect.PROVIDER]})
    if not operation.accepts_encryption:
        return stripped, encryption, None  # e.g. a delete: the provider takes no key here
    key = sent.key or sent.source_key
    respond_as = RespondAs(client_dialect.PROVIDER, key.md5_b64, key.sha256_b64, operation.name in dialect.WRITE_OPERATIONS)
    if dialect.CUSTOMER_KEYS:
        return stripped, sent, respond_as
    kms_key_id = policy.oss_kms_key_ids.get(key.sha256_b64)
    if kms_key_id is None:
        raise Refused(400, "InvalidRequest", f"{operation.provider} takes no customer keys and the policy maps this key "
                      f"(SHA-256 {key.sha256_b64}) to no KMS key in oss_kms_key_ids; it was not forwarded", "translation")
    return stripped, Encryption(managed="KMS", managed_key_id=kms_key_id), None


def render_dialect(dialect: ModuleType, request: Request, encryption: Encryption) -> tuple[Request, list[str]]:
    """The request as the upstream must see it: encryption headers added, Host naming the upstream."""
    rendered, added = dialect.render(request, encryption)
    if (request.header("host") or "").lower() != request.authority.lower():
        # Reverse-proxy mode: the client addressed keycourier, the upstream checks its own name.
        rendered = rendered.with_header_map({"host": request.authority})
        added.append("host")
    return rendered, added


def re_sign(signer: ModuleType, received: Request, rendered: Request, added: list[str], policy: Policy,
            secrets: Secrets, now: datetime, region: str) -> tuple[Request, Callable[[bytes], bytes] | None]:
    """Verify the client's signature, then sign the changed request with the same credential
    (SigV4 keeps the client's date and scope; SigV2 requests are signed afresh for `region`)."""
    if rendered == received:
        return received, None  # untouched: the provider checks the client's own signature
    try:
        signature = signer.read_signature(received)
    except signer.SignatureError as exc:
        raise Refused(403, "AccessDenied", f"cannot read the request's signature: {exc}", "bad_signature") from None
    if signature is None:
        raise Refused(403, "AccessDenied", "anonymous requests cannot be re-signed after keycourier adds headers; sign the request", "bad_signature")
    if signature.style in signer.HEADERLESS_STYLES:
        # Azure SAS and bearer tokens sign no x-ms-* header: the provider checks them, nothing to re-sign.
        return rendered, None
    try:
        credential = secrets.credential_for(policy, signature.access_key_id)
    except KeyUnavailable as exc:
        raise Refused(503, "ServiceUnavailable", f"cannot get credentials: {exc}", "key_unavailable") from None
    if credential is None:
        reason = "presigned" if "query" in signature.style else "bad_signature"
        raise Refused(403, "InvalidAccessKeyId", f"access key id {signature.access_key_id} is not in keycourier's credentials, so the request cannot be verified and re-signed", reason)
    try:
        signer.verify(received, signature, credential.secret_access_key, now)
        signed, seed = signer.resign(rendered, signature, credential.secret_access_key, added_headers=added,
                                     region=region, now=now)
        body = signer.body_resigner(signature, credential.secret_access_key, seed)
        return signed, body and spoil_on_error(body, signer.SignatureError)
    except signer.SignatureError as exc:
        reason = "presigned" if "query" in signature.style else "bad_signature"
        raise Refused(403, "SignatureDoesNotMatch", f"the client's signature was refused: {exc}", reason) from None


def spoil_on_error(transform: Callable[[bytes], bytes], error: type[Exception]) -> Callable[[bytes], bytes]:
    """A body transform that, once `transform` fails mid-stream (a bad chunk signature: headers are
    long sent), forwards zero bytes instead: the length stays as announced, so the upstream reads to
    the end and refuses the malformed body rather than waiting, and nothing of it is stored."""
    received = sent = 0
    failed = False

    def forward(data: bytes) -> bytes:
        nonlocal received, sent, failed
        received += len(data)
        if not failed:
            try:
                out = transform(data)
                sent += len(out)
                return out
            except error as exc:
                failed = True
                log.warning(f"request body refused mid-stream, its remainder is spoiled so the upstream rejects it: {exc}")
        out = bytes(received - sent)
        sent = received
        return out

    return forward
