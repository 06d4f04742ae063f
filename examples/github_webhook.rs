//! Placeholder while the reference webhook router is written.
fn main() {}
