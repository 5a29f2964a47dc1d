"""controller layer; see design.md."""
