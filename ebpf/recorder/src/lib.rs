//! The userspace side of the incfs recorder.
