"""Drop-in facades for the tools engines use today (``torch_memory_saver``)."""
