"""agent layer; see design.md."""
