"""The pure model: the policy language, identities, translation to QEMU's argv,
settings, allocation choices and the host network's text. No IO, no imports
from outside `kvmgate.model` except `kvmgate.errors`: unit-tested without root."""
