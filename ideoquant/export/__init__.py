"""Export: the convert pipeline and one branch writer per file kind; then card, verify, publish, inspect, compare."""
