"""The TensorBoard side: the plugin (routes, flags) and the render service."""
