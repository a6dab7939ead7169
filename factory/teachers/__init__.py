"""Teacher registry; importing this package registers every teacher."""

from factory.teachers import mobileface  # noqa: F401  (registers itself)
from factory.teachers.registry import TeacherEntry, load_teacher, register_teacher, teacher_entry, teacher_names

__all__ = ["TeacherEntry", "load_teacher", "register_teacher", "teacher_entry", "teacher_names"]
