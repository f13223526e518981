"""Region masks: generators (SAM, superpixels, graph-based regions) and their store."""
