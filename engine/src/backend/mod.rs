//! Compute backends. `cpu` is the f32 reference every other backend is checked against.

pub mod cpu;
