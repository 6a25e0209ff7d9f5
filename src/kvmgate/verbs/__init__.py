"""The verbs: one module per group, each with a `run(req, who, paths)` that the
entry point dispatches to. A verb module imports the layers below (ops, host,
store, model) and `verbs.common`, never another verb module."""
