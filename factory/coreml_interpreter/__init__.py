"""A reference interpreter for Core ML ML programs, so .mlpackage artifacts can be verified off macOS."""

from factory.coreml_interpreter.interpreter import CoreMLInterpreter, load_program

__all__ = ["CoreMLInterpreter", "load_program"]
