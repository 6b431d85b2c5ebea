"""Student models (open_clip) and the project's model configs."""
