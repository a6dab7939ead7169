"""Test double for Android phones: an adbd simulator the real adb client connects to (see sim.py)."""
