"""Root's IO on the state and runtime trees: the registry, runtime records,
locks, the policy file, and the atomic-write and lock helpers they share."""
