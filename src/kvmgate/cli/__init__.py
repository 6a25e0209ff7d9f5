"""The user-facing front end: help, friendly parsing, and the hand-off to the helper."""
