//! Tests across crates in one binary (one link, not 6): each file of this directory is
//! a module here, its name the filter, e.g. `cargo test --test it -- client::`.

mod common;

#[path = "client.rs"]
mod client;
#[path = "deploy_lb.rs"]
mod deploy_lb;
#[path = "replica_kill.rs"]
mod replica_kill;
#[path = "resilience.rs"]
mod resilience;
#[path = "tls_client.rs"]
mod tls_client;
#[path = "wire_to_loss.rs"]
mod wire_to_loss;
