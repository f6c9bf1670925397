//! The client library's integration tests in one binary (one link, not 3): each file of this directory is
//! a module here, its name the filter, e.g. `cargo test --test it -- connect_errors::`.

#[path = "connect_errors.rs"]
mod connect_errors;
#[path = "distill_smoke.rs"]
mod distill_smoke;
#[path = "loss.rs"]
mod loss;
