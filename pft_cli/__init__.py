"""pft_cli."""
