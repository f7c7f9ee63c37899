"""The grabber process: frame sources, recordings, line buffer, fastener finding and crops."""
