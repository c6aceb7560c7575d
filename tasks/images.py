# SHIM(17): moved; deleted by the final import rewrite
from ingest.images import (  # noqa: F401
    CocoFormatError,
    ImageInfo,
    ImageProblem,
    check_image,
    check_images,
    coco_file_names,
    index_image_folder,
    read_bounded,
    resolve_inside,
)
