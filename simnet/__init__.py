"""A simulated mobile network for the demo and the end-to-end tests."""
