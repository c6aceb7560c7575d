# SHIM(17): moved; deleted by the final import rewrite
from schemas.validate import ValidationFailed, ValidationReport, validate  # noqa: F401
