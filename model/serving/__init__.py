"""Serving the network: the engine, its scheduler, KV-cache slots, autocomplete rules, sampling,
the model thread, CPU kernels and the fixed-shape decode step. Modules here swap faster pieces
into the network (cache views, CPU linear layers) without the network file knowing them."""
