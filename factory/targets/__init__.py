"""Target registry; importing this package registers every mobile runtime."""

from factory.targets import coreml, executorch, tflite  # noqa: F401  (each registers itself)
from factory.targets.base import (
    CompiledArtifact,
    CompileRequest,
    Runner,
    Target,
    get_target,
    precision_names,
    register_target,
    target_for_path,
    target_names,
    verification_runner,
)

__all__ = [
    "CompileRequest",
    "CompiledArtifact",
    "Runner",
    "Target",
    "get_target",
    "precision_names",
    "register_target",
    "target_for_path",
    "target_names",
    "verification_runner",
]
