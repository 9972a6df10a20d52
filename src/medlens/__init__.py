"""medlens."""
