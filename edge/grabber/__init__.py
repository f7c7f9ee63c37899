"""The grabber process: frame sources, recordings, line buffer, rail and fastener finding, crops."""
