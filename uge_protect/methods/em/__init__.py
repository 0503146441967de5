"""EM: error-minimizing noise (sample-wise, class-wise, and against a CLIP)."""
