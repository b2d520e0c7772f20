"""Network layer: the only place that touches py-libp2p."""
