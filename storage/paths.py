# SHIM(17): moved; deleted by the final import rewrite
from schemas.paths import (  # noqa: F401
    NAME_PATTERN,
    SafeName,
    UnsafeName,
    check_name,
    safe_child,
    stored_root,
)
