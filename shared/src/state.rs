//! Typed access to the key-value table items (DESIGN §4).
