"""What the controller and the agents must agree on: config, chunk hashing, Redis keys, messages."""
