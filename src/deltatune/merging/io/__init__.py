"""Files: safetensors checkpoints read and written tensor by tensor, pre-merge checks, the streaming merge."""
