"""The device lab: runs built artifacts on Android phones over adb.

Reads only a build folder (`reports/<recipe>/manifest.json`, the artifacts and golden faces it
lists), never `factory` internals. `python -m mobile_harness devices | run | report | check`.
"""
