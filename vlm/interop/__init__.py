"""Weight mappings between vlm components and other libraries' models."""
