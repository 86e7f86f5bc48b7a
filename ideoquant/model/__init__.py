"""Model plumbing: the one tensor inventory, building a model on the meta device, the FP8 linear, the packed sequence."""
