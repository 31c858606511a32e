"""The training code of each algorithm: strategies the one training loop calls (torch)."""
