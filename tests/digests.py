"""Key fingerprints as the providers spell them, computed independently of keycourier's own code."""
from __future__ import annotations

import base64
import hashlib


def md5_b64(data: bytes) -> str:
    """S3's x-amz-server-side-encryption-customer-key-MD5, OSS's Content-MD5 spelling."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def sha256_b64(data: bytes) -> str:
    """Azure's x-ms-encryption-key-sha256."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()
