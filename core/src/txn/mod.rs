//! Memory transactions (in progress).
