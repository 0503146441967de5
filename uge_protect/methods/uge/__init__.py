"""UGE: noise learnable only by the owner's authorized network."""
