"""Teacher registry; importing this package registers every teacher."""

from factory.teachers import dlib_resnet, dlib_torch, mobileface  # noqa: F401  (each registers itself)
from factory.teachers.registry import (
    TeacherEntry,
    load_teacher,
    register_teacher,
    teacher_card,
    teacher_entry,
    teacher_names,
)

__all__ = ["TeacherEntry", "load_teacher", "register_teacher", "teacher_card", "teacher_entry", "teacher_names"]
