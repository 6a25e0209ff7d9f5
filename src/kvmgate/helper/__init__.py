"""The privileged helper: the only code that runs as root on a user's behalf.

It is reached through sudo, runs under `python3 -I -S` from a root-owned
directory, and imports the standard library and this package only.
"""
