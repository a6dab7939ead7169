"""The device lab: runs built artifacts on Android phones over adb.

Reads only a build folder (`reports/<recipe>/manifest.json` and the artifacts it lists), never
`factory` internals. The adb runner itself is not built yet; `python -m mobile_harness` says so.
"""
