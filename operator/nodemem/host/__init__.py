"""host layer; see design.md."""
