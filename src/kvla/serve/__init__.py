"""Serving a kvla policy to robots over the network, in openpi's protocol (`kvla serve`)."""
