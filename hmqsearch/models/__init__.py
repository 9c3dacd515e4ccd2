"""Model zoo and pretrained-weight loading."""
