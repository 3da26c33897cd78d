//! Morsels from the guest side (filled in with the morsel hypercalls).
