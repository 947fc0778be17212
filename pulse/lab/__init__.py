"""The lab's Python API: launch the system, drive checkouts, break things and watch them heal."""
