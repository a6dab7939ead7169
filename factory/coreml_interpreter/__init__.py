"""A reference interpreter for Core ML ML programs, so .mlpackage artifacts can be verified off macOS."""

from factory.coreml_interpreter.interpreter import EMULATION, CoreMLInterpreter, load_program

__all__ = ["EMULATION", "CoreMLInterpreter", "load_program"]
