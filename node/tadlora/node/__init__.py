"""The tadlora node daemon: discovery, transport and the training loop that joins them."""
