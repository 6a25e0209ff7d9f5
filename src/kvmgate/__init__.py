"""kvmgate: many users share KVM on one host, each through a small secure wrapper."""

__version__ = "0.1.0"
