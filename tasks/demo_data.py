# SHIM(17): moved; deleted by the final import rewrite
from ingest.demo_data import (  # noqa: F401
    COLORS,
    SPLIT_FOLDERS,
    make_scene,
    photo_dialog,
    write_demo,
    write_split,
)
