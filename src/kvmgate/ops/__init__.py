"""Operations on one VM, shared by the verbs and by kvmgate's internal actors
(the PAM worker, gated, the reaper, autostart and watch). Each takes typed
arguments, holds the VM's operation lock while it acts, and re-checks the VM's
state under it. Nothing here parses a command line or prints."""
