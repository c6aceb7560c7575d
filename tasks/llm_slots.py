# SHIM(17): moved; deleted by the final import rewrite
from tasks.runtime.slots import free_dead, hold_slots  # noqa: F401
