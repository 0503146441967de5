"""T2UE: noise generated from the caption alone."""
