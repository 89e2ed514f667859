"""Case identifiers fit to write down.

Record uids and image paths can carry patient identifiers (CBIS-DDSM case folders hold the patient id,
MIMIC-CXR paths the subject id, NIH file names the patient number). Nothing medistill writes (logs,
metrics.json, reports, galleries, checkpoints) names a case by them: it shows `case_id(uid)`, a salted hash.
The salt is random per process, so the same case gets unrelated ids in different runs and the ids cannot be
recomputed from a list of patient ids. To match ids to records (say, the samples a non-finite loss named),
run with the environment variable MEDISTILL_CASE_SALT set and hash your uids with the same salt.
"""

from __future__ import annotations

import hashlib
import os
import secrets

_SALT = os.environ.get("MEDISTILL_CASE_SALT") or secrets.token_hex(16)


def case_id(uid: str) -> str:
    """`case-` and 12 hex digits of SHA-256(salt, uid)."""
    return "case-" + hashlib.sha256(f"{_SALT}\x00{uid}".encode()).hexdigest()[:12]
