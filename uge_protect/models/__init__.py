"""Networks shared by methods and evaluation: the classifier zoo, the open_clip builder, text encoders, training helpers."""
