"""tern gateway: arrives with its issue; the layout is fixed now."""
