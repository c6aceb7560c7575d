# SHIM(17): moved; deleted by the final import rewrite
from ingest.visdial import ParsedVisdial, VisdialFormatError, dialog_columns, parse_visdial  # noqa: F401
