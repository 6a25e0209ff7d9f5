"""The helper's side effects on the host: who the caller is and acting with
their rights, opening resources and starting QEMU, cgroups, QMP, saving and
restoring state, the host's networks, the audit log."""
