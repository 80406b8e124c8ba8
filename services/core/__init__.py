"""The shared core: imports none of builder, runtime or router."""
