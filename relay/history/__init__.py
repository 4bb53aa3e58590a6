"""K-line history: hikyuu HDF5 store, history service and mirror (sync)."""
