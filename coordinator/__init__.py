"""The coordinator: the emulated kernel memory manager."""
