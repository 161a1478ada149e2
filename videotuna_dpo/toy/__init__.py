"""The embedded demo's world: procedural captioned videos and a tiny text-to-video model."""
