"""cmserve: the HTTP server, dynamic batcher and captured sampler runner."""
