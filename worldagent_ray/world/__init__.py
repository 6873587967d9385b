"""World models: the sandbox (embedded default) and diffusers video generation."""
