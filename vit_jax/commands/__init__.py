"""The commands a user runs: train, transfer, plan, predict, visualize, export."""
