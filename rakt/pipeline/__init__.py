"""The stages that build a transfer set, and the CLI that runs them."""
