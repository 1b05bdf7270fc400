"""Pure torch RL math: advantages, policy losses, off-policy corrections."""
