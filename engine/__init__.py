"""How training and evaluation run: data, packing, optimizer, training loop, generation, metrics."""
