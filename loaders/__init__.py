"""The loader process (one per client), the model store and the load backends."""
