# SHIM(17): moved; deleted by the final import rewrite
from llmcalls.server import (  # noqa: F401
    Faults,
    Limits,
    MiB,
    TeacherBackend,
    make_state,
    running_server,
    serve,
    teacher_response,
)
